"""Build the models a config names: from the checkpoint folder, or random tiny models for debug runs.

Shared by inference and training so both find weights in the same places (``checkpoints.py`` holds the layout).
This layer sits above the models and the pipeline: models take tensors and file paths, this module knows where
the files of a config live. Training-only builders live in ``training/`` so inference never imports them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoints as ckpt
from .config import Config
from .models.kv_cache import CausalSpec
from .interfaces import Decoder, Registry, Reward, TextEncoderLike
from .models.text_encoder import TextEncoder
from .models.vae import WAN21_VAE_ARCH, IdentityVAE, WanVAE
from .models.wan import WanConfig, WanModel, init_random_, init_weights_
from .pipeline import StreamingPipeline
from .pipeline_parallel import WanPipelineStage
from .quantize import quantize
from .streaming import StreamSettings, latent_size
from .toy import ToyMotionReward, ToyTextEncoder

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
              use_ema: bool = False, seed: int = 0, device="cpu", dtype=torch.float32, what: str = "generator",
              init: str = "debug", lora: str | Path | None = None, lora_scale: float = 1.0) -> WanModel:
    """A Wan DiT of ``flavor``.

    With ``cfg.model.random_init`` (tiny debug runs) and no ``weights``: random non-degenerate weights.
    Otherwise ``weights`` (a generator / trainer / ode_init checkpoint) if given, else the base Wan2.1
    folder of that size under ``cfg.checkpoint_root``. The model is built on the meta device and the weights
    are assigned, so a 14B model is never initialised just to be overwritten. ``lora``: a LoRA file merged into
    the weights first (``checkpoints.merge_lora``, scale ``lora_scale``).
    """
    if weights is None and cfg.model.random_init:
        if lora:
            raise ValueError(f"model.lora={lora} needs weights to merge into, but model.random_init is set and no "
                             f"{what} checkpoint was given")
        if init != "reference" and flavor not in ("tiny", "toy"):
            # Real sizes (benchmarks): allocated on the target device in the target dtype and filled there, with
            # no CPU copy and no float32 detour (init_random_ draws on each parameter's device). tiny and toy
            # keep their CPU init followed by a move: the recorded test outputs depend on it.
            with torch.device("meta"):
                model = WanModel.from_flavor(flavor, causal=causal)
            return init_random_(model.to(dtype=dtype).to_empty(device=device), seed=seed)
        model = WanModel.from_flavor(flavor, causal=causal)
        if init == "reference":  # a model about to be trained from scratch (e.g. the toy teacher)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                init_weights_(model)
        else:
            init_random_(model, seed=seed)
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
    if lora:
        adapters = ckpt.load_lora_file(ckpt.require_file(lora, f"LoRA of the {what} (model.lora)"))
        state = ckpt.merge_lora(state, lora_scale, lora=adapters)
        log.info("merged the LoRA %s into the %s (scale %g)", lora, what, lora_scale)
    with torch.device("meta"):
        model = WanModel(model_cfg, causal)
    ckpt.load_weights(model, state, what=what, source=str(source))
    log.info("loaded %s (%s) from %s", what, flavor, source)
    return model.to(device=device, dtype=dtype)


def build_generator(cfg: Config, *, checkpoint: str | Path | None = None, use_ema: bool = False, device="cpu",
                    dtype=torch.float32) -> WanModel:
    """The causal student, with the attention pattern of ``cfg.causal``."""
    model = build_dit(cfg, cfg.model.generator, causal=cfg.causal, weights=checkpoint,
                      use_ema=use_ema or cfg.model.use_ema, device=device, dtype=dtype, what="generator",
                      lora=cfg.model.lora or None, lora_scale=cfg.model.lora_scale)
    model.rope.precision = getattr(torch, cfg.model.rope_precision)
    return model.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)


def build_inference_generator(cfg: Config, *, device="cpu", **kwargs) -> WanModel:
    """The generator for streaming inference: ``build_generator`` plus ``model.quantize`` and ``model.compile``
    (mode, fallback). With ``model.pipeline_parallel`` in a process group of N ranks, this rank's
    ``WanPipelineStage``: the model is loaded on the CPU and only the stage's layers reach ``device``."""
    stages = dist.get_world_size() if cfg.model.pipeline_parallel and dist.is_initialized() else 1
    if stages > 1:
        model = WanPipelineStage.from_model(build_generator(cfg, device="cpu", **kwargs), stage=dist.get_rank(),
                                            stages=stages, micro_batches=cfg.model.pipeline_micro_batches,
                                            device=device)
    else:
        model = build_generator(cfg, device=device, **kwargs)
    model = quantize(model, cfg.model.quantize)
    if cfg.model.compile:
        model.compile_layers(cfg.model.compile_mode, fallback=cfg.model.compile_fallback)
    return model


# ------------------------------------------------------------------------------- pluggable parts, by name
TEXT_ENCODERS: Registry[TextEncoderLike] = Registry("text encoder", "model.text_encoder")
DECODERS: Registry[Decoder] = Registry("decoder", "model.vae")
REWARDS: Registry[Reward] = Registry("reward", "model.reward")
_NO_FILES = {"tiny", "toy", "identity", "toy_motion"}  # parts that read nothing under checkpoint_root


def needs_checkpoint_root(cfg: Config) -> bool:
    """Whether building the config's text encoder or decoder reads ``checkpoint_root`` (umt5-xxl, the Wan VAE)."""
    return not cfg.model.random_init and not {cfg.model.text_encoder, cfg.model.vae} <= _NO_FILES


def _with_download_hint(load, train: bool = False):
    """Call ``load()``; a missing file's one-line error gets the download hint (the models name the file)."""
    try:
        return load()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; {ckpt.download_hint(train)}") from None


@TEXT_ENCODERS.register("umt5-xxl")
def _umt5_xxl(cfg: Config, device, dtype) -> TextEncoder:
    if cfg.model.random_init:  # the real architecture, random weights (benchmarks)
        return TextEncoder.random(device=device, dtype=dtype)
    folder = ckpt.asset_path(cfg.checkpoint_root, "wan_1_3b")
    return _with_download_hint(lambda: TextEncoder.from_wan_folder(folder, dtype=dtype, device=device))


@TEXT_ENCODERS.register("tiny")
def _tiny_text(cfg: Config, device, dtype) -> TextEncoder:
    return TextEncoder.tiny().to(device=device, dtype=dtype)


@TEXT_ENCODERS.register("toy")
def _toy_text(cfg: Config, device, dtype) -> ToyTextEncoder:
    return ToyTextEncoder(dim=WanConfig.from_flavor(cfg.model.generator).text_dim).to(device=device, dtype=dtype)


@DECODERS.register("wan2.1")
def _wan21_vae(cfg: Config, device, dtype) -> WanVAE:
    if cfg.model.random_init:
        return WanVAE.random(WAN21_VAE_ARCH).to(device=device, dtype=dtype)
    path = ckpt.asset_path(cfg.checkpoint_root, "vae")
    return _with_download_hint(lambda: WanVAE.from_wan_pth(path, device=device, dtype=dtype))


@DECODERS.register("tiny")
def _tiny_vae(cfg: Config, device, dtype) -> WanVAE:
    return WanVAE.tiny().to(device=device, dtype=dtype)


@DECODERS.register("identity")
def _identity(cfg: Config, device, dtype) -> IdentityVAE:
    return IdentityVAE(dtype).to(device)


def build_text_encoder(cfg: Config, *, device="cpu", dtype=torch.float32) -> TextEncoderLike:
    """The config's text encoder (``model.text_encoder``, one of ``TEXT_ENCODERS``)."""
    return TEXT_ENCODERS.build(cfg.model.text_encoder, cfg, device, dtype)


def build_vae(cfg: Config, *, device="cpu", dtype=torch.float32) -> Decoder:
    """The config's decoder (``model.vae``, one of ``DECODERS``): the Wan VAE, or the identity for a world that
    lives in latent space."""
    return DECODERS.build(cfg.model.vae, cfg, device, dtype)


def build_pipeline(cfg: Config, *, checkpoint: str | Path | None = None, use_ema: bool = False, device="cpu",
                   dtype=torch.float32, text_encoder_device=None) -> StreamingPipeline:
    """The streaming pipeline of a config: generator (``checkpoint`` or the config's weights), text encoder, VAE,
    schedule and default video size (tiny random models for ``configs/tiny.yaml``)."""
    vae = build_vae(cfg, device=device, dtype=dtype)  # first: it owns the geometry the video size is checked on
    latent_size(vae, WanConfig.from_flavor(cfg.model.generator).patch_size, cfg.video.height, cfg.video.width)
    generator = build_inference_generator(cfg, checkpoint=checkpoint or cfg.model.checkpoint or None, use_ema=use_ema,
                                          device=device, dtype=dtype)
    text_device = text_encoder_device or cfg.text.encoder_device or ("cpu" if cfg.text.offload_text_encoder else device)
    text_encoder = build_text_encoder(cfg, device=text_device, dtype=dtype)
    return StreamingPipeline(generator, text_encoder, vae, stream_settings(cfg))


def stream_settings(cfg: Config) -> StreamSettings:
    """The block loop's settings of a config."""
    return StreamSettings(denoising_steps=tuple(cfg.schedule.denoising_step_list),
                          warp=cfg.schedule.warp_denoising_step, timestep_shift=cfg.schedule.timestep_shift,
                          context_noise=cfg.schedule.context_noise, context_pass=cfg.schedule.context_pass,
                          offload_text_encoder=cfg.text.offload_text_encoder, height=cfg.video.height,
                          width=cfg.video.width)


def build_reward(cfg: Config, *, device="cpu", dtype=torch.float32, require_template: bool = True) -> Reward:
    """The config's reward (``model.reward``, one of ``REWARDS``). VideoReward is prompted as VideoAlign trained it:
    the training prompt is read from VideoAlign's ``prompt_template.py`` in the VideoReward folder. Without that
    file, Re-DMD training (``require_template``, the default) stops and says how to get it; scoring outside
    training (``require_template=False``) falls back to our own wording, with a warning that the scores are not
    VideoAlign's.
    """
    return REWARDS.build(cfg.model.reward, cfg, device, dtype, require_template)


@REWARDS.register("toy_motion")
def _toy_motion(cfg: Config, device, dtype, require_template: bool) -> ToyMotionReward:
    return ToyMotionReward().to(device)


@REWARDS.register("tiny")
def _tiny_reward(cfg: Config, device, dtype, require_template: bool):
    from .models.video_reward import VideoPreprocessConfig, VideoReward

    tr = cfg.training
    preprocess = VideoPreprocessConfig(fps=tr.reward_fps, sample_all_frames=tr.reward_sample_all_frames,
                                       reference_pixel_range=tr.reward_pixel_range == "reference", min_pixels=56 * 56)
    return VideoReward.tiny(preprocess=preprocess).to(device=device, dtype=dtype)


@REWARDS.register("videoreward")
def _video_reward(cfg: Config, device, dtype, require_template: bool):
    from .models.video_reward import VideoReward

    tr = cfg.training
    folder = ckpt.find_video_reward_dir(cfg.checkpoint_root)
    template = folder / ckpt.VIDEO_REWARD_TEMPLATE
    if not template.is_file():
        if require_template:
            raise FileNotFoundError(
                f"missing VideoAlign prompt template '{template}' (the prompt VideoReward was trained with; "
                f"without it the rewards would come from a prompt it never saw); run `bash download_checkpoints.sh "
                f"--train` or download {ckpt.VIDEO_REWARD_TEMPLATE_URL} to that path")
        template = None
    return _with_download_hint(lambda: VideoReward.from_pretrained(
        folder, prompt_template_file=template, device=device, dtype=dtype, fps=tr.reward_fps,
        sample_all_frames=tr.reward_sample_all_frames, reference_pixel_range=tr.reward_pixel_range == "reference"),
        train=True)


# ---------------------------------------------------------------------------------- device and dtype of a run
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``--device`` of every entry point: ``auto`` (``cuda:<local_rank>`` when a GPU is available, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``. A bad value raises a one-line ``ValueError`` that names it and the fix."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but no CUDA GPU is available (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` of every entry point: ``auto`` (bf16 on a GPU, fp32 on the CPU), ``bf16``, ``fp16`` or ``fp32``."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r} is not a dtype; use auto, bf16, fp16 or fp32")
    return dtypes[name]
