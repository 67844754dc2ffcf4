"""The models of a Re-DMD training job, built from a config (weights found as ``reward_forcing/build.py`` finds
them for inference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checkpoints as ckpt
from ..build import build_dit, build_reward, build_text_encoder, build_vae
from ..config import Config
from ..models.text_encoder import TextEncoder
from ..models.vae import WanVAE
from ..models.wan import WanModel
from .lora import adapted_models, add_adapters


@dataclass
class TrainingModels:
    """What a run needs; which models exist and which train depends on ``training.mode``:
    dmd: generator and critic train, teacher frozen; ode: generator trains (teacher unused: the pairs hold its
    samples); teacher: the teacher trains."""

    generator: WanModel | None  # causal student
    critic: WanModel | None  # fake score
    teacher: WanModel | None  # real score
    text_encoder: TextEncoder  # frozen; anything with forward(prompts) and encode_negative
    vae: WanVAE  # frozen decoder (the identity for a latent-space world)
    reward: object | None = None  # frozen, score(pixels, prompts) -> {name: [B]}; None when beta == 0


def _file(path: str, what: str) -> str | None:
    return ckpt.require_file(path, what, train=True) if path else None


def build_training_models(cfg: Config, *, device="cpu", dtype=torch.float32, frozen_dtype=None) -> TrainingModels:
    """The models of ``training.mode``. The student starts from ``training.generator_ckpt`` (dmd: the ODE init;
    ode: e.g. the teacher's weights) unless ``model.random_init``; teacher and critic from ``teacher_ckpt`` /
    ``critic_ckpt`` when set, else the base weights of their flavor (random for tiny debug runs; a teacher
    trained from scratch gets the reference initialisation). Frozen models run in ``frozen_dtype`` (bf16 on
    GPU); trained ones keep fp32 master weights, or with ``training.lora`` frozen weights in ``frozen_dtype`` and
    fp32 adapters (``training/lora.py``)."""
    frozen_dtype = frozen_dtype or dtype
    tr = cfg.training
    generator = critic = teacher = None
    if tr.mode in ("dmd", "ode"):
        weights = None
        if not cfg.model.random_init:
            what = "ODE-initialised student" if tr.mode == "dmd" else "student's starting weights"
            weights = ckpt.require_file(tr.generator_ckpt, f"{what} (training.generator_ckpt)", train=True)
        generator = build_dit(cfg, cfg.model.generator, causal=cfg.causal, weights=weights, seed=0,
                              device=device, dtype=dtype, what="generator")
    if tr.mode == "dmd":
        # Tiny debug runs: critic and teacher share one random init (as the real critic starts from base weights).
        critic = build_dit(cfg, cfg.model.critic, weights=_file(tr.critic_ckpt, "critic (training.critic_ckpt)"),
                           seed=1, device=device, dtype=dtype, what="critic")
    if tr.mode in ("dmd", "teacher"):
        trained = tr.mode == "teacher"
        teacher = build_dit(cfg, cfg.model.teacher, weights=_file(tr.teacher_ckpt, "teacher (training.teacher_ckpt)"),
                            seed=1, device=device, dtype=dtype if trained else frozen_dtype, what="teacher",
                            init="reference" if trained else "debug")
    adapted = adapted_models(tr)  # low-rank adapters on what trains (in place); its weights frozen
    for i, (name, model) in enumerate((("generator", generator), ("critic", critic), ("teacher", teacher))):
        if name in adapted:
            add_adapters(model, tr.lora, frozen_dtype=frozen_dtype, seed=tr.seed + i)
    text_encoder = build_text_encoder(cfg, device=device, dtype=frozen_dtype)
    vae = build_vae(cfg, device=device, dtype=frozen_dtype)
    reward = (build_reward(cfg, device=device, dtype=frozen_dtype)
              if tr.mode == "dmd" and (tr.beta != 0 or tr.critic_tilt_beta != 0) else None)
    return TrainingModels(generator, critic, teacher, text_encoder, vae, reward)
