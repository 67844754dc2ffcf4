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


@dataclass
class TrainingModels:
    generator: WanModel  # causal student (trainable)
    critic: WanModel  # fake score (trainable)
    teacher: WanModel  # real score (frozen)
    text_encoder: TextEncoder  # frozen
    vae: WanVAE  # frozen
    reward: object | None = None  # VideoReward (frozen); None when beta == 0


def build_training_models(cfg: Config, *, device="cpu", dtype=torch.float32, frozen_dtype=None) -> TrainingModels:
    """Student (from training.generator_ckpt), critic (base weights of its flavor), teacher, text encoder, VAE,
    reward. Frozen models run in ``frozen_dtype`` (bf16 on GPU); trainable ones keep fp32 master weights."""
    frozen_dtype = frozen_dtype or dtype
    tr = cfg.training
    weights = None
    if not cfg.model.random_init:
        weights = ckpt.require_file(tr.generator_ckpt, "ODE-initialised student (training.generator_ckpt)",
                                    train=True)
    generator = build_dit(cfg, cfg.model.generator, causal=cfg.causal, weights=weights, seed=0,
                          device=device, dtype=dtype, what="generator")
    # Tiny debug runs: critic and teacher share one random init (as the real critic starts from base weights).
    critic = build_dit(cfg, cfg.model.critic, seed=1, device=device, dtype=dtype, what="critic")
    teacher = build_dit(cfg, cfg.model.teacher, seed=1, device=device, dtype=frozen_dtype, what="teacher")
    text_encoder = build_text_encoder(cfg, device=device, dtype=frozen_dtype)
    vae = build_vae(cfg, device=device, dtype=frozen_dtype)
    reward = build_reward(cfg, device=device, dtype=frozen_dtype) if tr.beta != 0 else None
    return TrainingModels(generator, critic, teacher, text_encoder, vae, reward)
