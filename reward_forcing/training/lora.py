"""LoRA training: low-rank adapters on a frozen DiT, with peft (``training.lora``).

``add_adapters`` freezes a model, stores its weights in the frozen dtype (bf16 on a GPU: half the bytes of the
fp32 master weights full fine-tuning keeps) and lets peft wrap the target linear layers, whose adapters train in
float32. The model stays a ``WanModel`` (peft's ``inject_adapter_in_model``, not a ``PeftModel`` wrapper), so the
trainer, the rollout, FSDP2 and DCP see the same object as without LoRA; only the state-dict keys of the adapted
layers change (``...q.base_layer.weight``, ``...q.lora_A.default.weight``). ``checkpoints.merge_lora`` turns those
back into plain keys for every export.

``parameter_bytes`` counts what training holds per model (weights, gradients, AdamW's two moments), on any device
including ``meta``: the figures of docs/training.md come from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraSettings


def lora_scaling(settings: LoraSettings) -> float:
    """The adapters' output scale ``alpha / rank`` (peft's ``scaling``), with ``alpha = 0`` meaning ``rank``."""
    return (settings.alpha or settings.rank) / settings.rank


def adapted_models(tr) -> tuple[str, ...]:
    """The models of ``tr.mode`` (a ``TrainingConfig``) that get adapters: what trains there, the critic only with
    ``tr.lora.critic``; none when ``tr.lora.rank`` is 0."""
    if not tr.lora.rank:
        return ()
    return {"dmd": ("generator", "critic") if tr.lora.critic else ("generator",), "ode": ("generator",),
            "teacher": ("teacher",)}[tr.mode]


def add_adapters(model: nn.Module, settings: LoraSettings, *, frozen_dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Freeze ``model`` in ``frozen_dtype`` and add trainable float32 LoRA adapters to ``settings.targets``
    (in place; returns ``model``). The adapters start as peft initialises them (B = 0, so the model's output is
    unchanged until the first update; A random, drawn under ``seed``: every rank and every resumed run draws the
    same, and the global RNG is left as it was)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False).to(frozen_dtype)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=0.0,
                        target_modules=list(settings.targets), bias="none")
    try:
        with torch.random.fork_rng(devices=[]):  # peft creates the adapters on the CPU, then moves them
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
    except ValueError as err:  # peft: no module matched
        raise ValueError(f"training.lora.targets={list(settings.targets)}: {err}") from None
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return model


@dataclass
class ParameterBytes:
    """What one model holds in training: its parameters, and gradients + AdamW moments of the trained ones."""

    parameters: int  # count
    trainable: int  # count
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes


def parameter_bytes(model: nn.Module, *, trained: bool = True) -> ParameterBytes:
    """Bytes of ``model``'s weights at their dtypes, plus (``trained``) one gradient of each trainable parameter's
    dtype and AdamW's two float32 moments; works on the meta device (nothing allocated)."""
    params = list(model.parameters())
    train = [p for p in params if p.requires_grad] if trained else []
    return ParameterBytes(
        parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in train),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        gradient_bytes=sum(p.numel() * p.element_size() for p in train),
        optimizer_bytes=sum(2 * p.numel() * 4 for p in train))
