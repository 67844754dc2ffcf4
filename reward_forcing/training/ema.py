"""Exponential moving average of the generator, kept on each rank's FSDP2 shards."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..file_io import normalize_key
from .parallel import get_rank


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """``shadow <- decay * shadow + (1 - decay) * param`` over a (possibly FSDP2-sharded) module's trainable
    parameters (``requires_grad``: all of a fully fine-tuned model, the adapters of a LoRA one).

    The shadow holds float32 copies of each rank's **local shard** (``DTensor.to_local()``, or the plain tensor of
    an unsharded module), so an update is one ``torch._foreach_lerp_`` without communication. The reference
    instead gathered every parameter to a CPU copy with ``summon_full_params`` on each update. Creating the
    object copies the current weights, as the reference does when EMA starts.

    For resumable checkpoints pass the object as a ``stateful`` of ``checkpointing.save_training_state`` (its
    shards go through DCP, so every rank's part is saved); :meth:`full_state_dict` gathers the full weights
    for the exported checkpoint.
    """

    def __init__(self, module: nn.Module):
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] = []
        self._layout: list[tuple | None] = []  # (mesh, placements, shape, stride) of DTensor parameters
        with torch.no_grad():
            for name, param in module.named_parameters():
                if not param.requires_grad:  # frozen weights (LoRA's base) never change: nothing to average
                    continue
                self.names.append(normalize_key(name))
                self.shadow.append(_local(param).detach().to(torch.float32, copy=True))
                self._layout.append((param.device_mesh, param.placements, param.shape, param.stride())
                                    if isinstance(param, DTensor) else None)
        if not self.names:
            raise ValueError("module has no parameters to average")
        self.num_updates = 0

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        params = [_local(p).detach() for p in module.parameters() if p.requires_grad]
        if len(params) != len(self.shadow):
            raise ValueError(f"module has {len(params)} parameters but the EMA tracks {len(self.shadow)}; "
                             "update the EMA with the module it was created from")
        for p, s, name in zip(params, self.shadow, self.names):
            if p.shape != s.shape:
                raise ValueError(f"shape of {name!r} changed from {tuple(s.shape)} to {tuple(p.shape)} "
                                 "(was the module sharded after the EMA was created?)")
        return params

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        params = [p.to(torch.float32) for p in self._params(module)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        self.num_updates += 1

    def _as_checkpointable(self, i: int) -> torch.Tensor:
        layout = self._layout[i]
        if layout is None:
            return self.shadow[i]
        mesh, placements, shape, stride = layout
        # Shares storage with the shadow shard, so DCP loads into it in place.
        return DTensor.from_local(self.shadow[i], mesh, placements, run_check=False, shape=shape, stride=stride)

    def state_dict(self) -> dict[str, Any]:
        """``{"shadow": {name: tensor or DTensor}, "num_updates": int}``; sharded entries are DTensors, so
        ``torch.distributed.checkpoint`` saves every rank's shard and can reshard on load."""
        return {"shadow": {n: self._as_checkpointable(i) for i, n in enumerate(self.names)},
                "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        unexpected = [n for n in shadow if n not in set(self.names)]
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for i, name in enumerate(self.names):
            src = _local(shadow[name])
            if src.data_ptr() != self.shadow[i].data_ptr():
                if src.shape != self.shadow[i].shape:
                    raise ValueError(f"EMA shard {name!r} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(self.shadow[i].shape)}")
                self.shadow[i].copy_(src)
        self.num_updates = int(state.get("num_updates", 0))

    @torch.no_grad()
    def full_state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Full EMA weights (float32, CPU) on rank 0, an empty dict on other ranks.

        Collective for sharded modules (all-gathers one parameter at a time): call on every rank. With
        ``module`` its persistent buffers and frozen parameters are added, so the result loads strictly into it.
        """
        main = get_rank() == 0
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            full = self.shadow[i] if self._layout[i] is None else self._as_checkpointable(i).full_tensor()
            if main:
                out[name] = full.detach().to("cpu", copy=True)
        if module is not None:
            tracked = set(self.names)
            for key, value in module.state_dict().items():
                key = normalize_key(key)
                if key in tracked or not isinstance(value, torch.Tensor):
                    continue
                full = value.full_tensor() if isinstance(value, DTensor) else value  # collective: every rank
                if main:
                    out[key] = full.detach().to("cpu", copy=True)
        return out
