"""Build the models a config names: from the checkpoint folder, or random tiny models for debug runs.

Shared by inference and training so both find weights in the same places (``checkpoints.py`` holds the layout).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .config import Config
from .models.kv_cache import CausalSpec
from .models.text_encoder import TextEncoder
from .models.vae import WanVAE
from .models.wan import WanConfig, WanModel, init_random_

log = logging.getLogger(__name__)

_BASE_DIRS = {"1.3B": ckpt.WAN_1_3B_DIR, "14B": ckpt.WAN_14B_DIR}


def _config_for(flavor: str, folder: Path | None) -> WanConfig:
    """The flavor's numbers, checked against the folder's config.json when there is one."""
    cfg = WanConfig.from_flavor(flavor)
    if folder is not None and (folder / ckpt.DIT_CONFIG).is_file():
        found = WanConfig.from_json(folder / ckpt.DIT_CONFIG)
        if (found.dim, found.num_layers, found.num_heads) != (cfg.dim, cfg.num_layers, cfg.num_heads):
            raise ValueError(f"{folder / ckpt.DIT_CONFIG} describes dim {found.dim} x {found.num_layers} layers, "
                             f"not the {flavor} flavor the config asks for")
    return cfg


def build_dit(cfg: Config, flavor: str, *, causal: CausalSpec | None = None, weights: str | Path | None = None,
              use_ema: bool = False, seed: int = 0, device="cpu", dtype=torch.float32, what: str = "generator"
              ) -> WanModel:
    """A Wan DiT of ``flavor``.

    With ``cfg.model.random_init`` (tiny debug runs) and no ``weights``: random non-degenerate weights.
    Otherwise ``weights`` (a generator / trainer / ode_init checkpoint) if given, else the base Wan2.1
    folder of that size under ``cfg.checkpoint_root``. The model is built on the meta device and the weights
    are assigned, so a 14B model is never initialised just to be overwritten.
    """
    if weights is None and cfg.model.random_init:
        model = init_random_(WanModel.from_flavor(flavor, causal=causal), seed=seed)
        return model.to(device=device, dtype=dtype)
    if weights is not None:
        source = ckpt.require_file(weights, f"{what} checkpoint")
        state = ckpt.load_generator_state_dict(source, use_ema=use_ema)
        model_cfg = WanConfig.from_flavor(flavor)
    else:
        if flavor not in _BASE_DIRS:
            raise ValueError(f"there are no released base weights for the {flavor!r} flavor; set "
                             "model.random_init=true or pass a checkpoint")
        folder = ckpt.require_file(Path(cfg.checkpoint_root) / _BASE_DIRS[flavor], f"Wan2.1-T2V-{flavor} base weights "
                                   "folder", train=flavor == "14B")
        source = folder
        state = ckpt.read_state_dict(folder)
        model_cfg = _config_for(flavor, folder)
    with torch.device("meta"):
        model = WanModel(model_cfg, causal)
    ckpt.load_weights(model, state, what=what, source=str(source))
    log.info("loaded %s (%s) from %s", what, flavor, source)
    return model.to(device=device, dtype=dtype)


def build_generator(cfg: Config, *, checkpoint: str | Path | None = None, use_ema: bool = False, device="cpu",
                    dtype=torch.float32) -> WanModel:
    """The causal student, with the attention pattern of ``cfg.causal``."""
    model = build_dit(cfg, cfg.model.generator, causal=cfg.causal.spec(), weights=checkpoint, use_ema=use_ema,
                      device=device, dtype=dtype, what="generator")
    model.rope.precision = getattr(torch, cfg.model.rope_precision)
    return model.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)


def build_inference_generator(cfg: Config, **kwargs) -> WanModel:
    """The generator for streaming inference: ``build_generator`` plus ``model.compile``."""
    model = build_generator(cfg, **kwargs)
    return model.compile_blocks() if cfg.model.compile else model


def build_text_encoder(cfg: Config, *, device="cpu", dtype=torch.float32) -> TextEncoder:
    if cfg.model.text_encoder == "tiny":
        return TextEncoder.tiny().to(device=device, dtype=dtype)
    folder = ckpt.asset_path(cfg.checkpoint_root, "wan_1_3b")
    return TextEncoder.from_wan_folder(folder, dtype=dtype, device=device)


def build_vae(cfg: Config, *, device="cpu", dtype=torch.float32) -> WanVAE:
    if cfg.model.vae == "tiny":
        return WanVAE.tiny().to(device=device, dtype=dtype)
    return WanVAE.from_wan_pth(ckpt.asset_path(cfg.checkpoint_root, "vae"), dtype=dtype, device=device)


def build_reward(cfg: Config, *, device="cpu", dtype=torch.float32):
    """The frozen VideoReward model (tiny random one for debug runs)."""
    from .models.video_reward import VideoPreprocessConfig, VideoReward

    tr = cfg.training
    reference_range = tr.reward_pixel_range == "reference"
    if cfg.model.reward == "tiny":
        preprocess = VideoPreprocessConfig(fps=tr.reward_fps, sample_all_frames=tr.reward_sample_all_frames,
                                           reference_pixel_range=reference_range, min_pixels=56 * 56)
        model = VideoReward.tiny(preprocess=preprocess)
    else:
        model = VideoReward.from_pretrained(ckpt.find_video_reward_dir(cfg.checkpoint_root), device=device,
                                            dtype=dtype, sample_all_frames=tr.reward_sample_all_frames,
                                            reference_pixel_range=reference_range)
    return model.to(device=device, dtype=dtype)


def build_training_models(cfg: Config, *, device="cpu", dtype=torch.float32, frozen_dtype=None):
    """Student (from training.generator_ckpt), critic (base weights of its flavor), teacher, text encoder, VAE,
    reward. Frozen models run in ``frozen_dtype`` (bf16 on GPU); trainable ones keep fp32 master weights."""
    from .training.trainer import TrainingModels

    frozen_dtype = frozen_dtype or dtype
    tr = cfg.training
    weights = None
    if not cfg.model.random_init:
        weights = ckpt.require_file(tr.generator_ckpt, "ODE-initialised student (training.generator_ckpt)",
                                    train=True)
    generator = build_dit(cfg, cfg.model.generator, causal=cfg.causal.spec(), weights=weights, seed=0,
                          device=device, dtype=dtype, what="generator")
    # Tiny debug runs: critic and teacher share one random init (as the real critic starts from base weights).
    critic = build_dit(cfg, cfg.model.critic, seed=1, device=device, dtype=dtype, what="critic")
    teacher = build_dit(cfg, cfg.model.teacher, seed=1, device=device, dtype=frozen_dtype, what="teacher")
    text_encoder = build_text_encoder(cfg, device=device, dtype=frozen_dtype)
    vae = build_vae(cfg, device=device, dtype=frozen_dtype)
    reward = build_reward(cfg, device=device, dtype=frozen_dtype) if tr.beta != 0 else None
    return TrainingModels(generator, critic, teacher, text_encoder, vae, reward)
