"""The interfaces of the pluggable parts, as ``typing.Protocol`` classes, and the registry that names them.

A text encoder, a decoder or a reward is anything with these members; ``build.py`` registers one builder per name
(``model.text_encoder``, ``model.vae``, ``model.reward``), so a new one is one class and one registration line.
Sink policies are ``models.kv_cache.SinkPolicy`` / ``SINK_POLICIES``; reward weightings are pure functions in
``training/losses.py`` selected by config keys (docs/architecture.md, "Adding a part").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch


@runtime_checkable
class TextEncoderLike(Protocol):
    """``encoder(prompts) -> [B, L, text_dim]`` and the negative prompt's encoding for CFG."""

    def __call__(self, prompts: list[str]) -> torch.Tensor: ...

    def encode_negative(self, prompt: str, batch_size: int) -> torch.Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """Latents ``[B, F, C, h, w]`` <-> pixels ``[B, T, 3, H, W]`` in [-1, 1], with the geometry nobody re-derives."""

    spatial_stride: int
    temporal_stride: int
    dtype: torch.dtype

    def latent_size(self, height: int, width: int) -> tuple[int, int]: ...

    def video_frames(self, latent_frames: int) -> int: ...

    def chunk_frames(self, latent_frames: int, *, first: bool) -> int: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def stream_decoder(self): ...


@runtime_checkable
class Reward(Protocol):
    """``score(pixels [B, T, 3, H, W], prompts) -> {name: [B]}``; the trainer weights by ``training.reward_key``."""

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]: ...


T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> builders of one kind of part. ``@REGISTRY.register("name")`` adds a builder; ``REGISTRY.build(name,
    ...)`` calls it, and an unknown name is one line naming the config key and the choices."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return add

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def build(self, name: str, *args, **kwargs) -> T:
        if name not in self._builders:
            raise ValueError(f"{self.key} {name!r} is not one of {self.names}")
        return self._builders[name](*args, **kwargs)
