"""What a stream runs on: the causal generator and its block loop, the text encoder and the decoder.

:class:`StreamingModels` bundles them with the few helpers every stream needs (device, latent geometry, prompt
encoding, the phase hook). A :class:`~reward_forcing.interactive.session.Session` takes one;
:class:`~reward_forcing.pipeline.StreamingPipeline` *is* one, plus ``stream()`` / ``generate()``. The settings of
the block loop and their defaults (the reference's) live in :class:`StreamSettings`, once: the config schema
takes its defaults from here and ``build.stream_settings`` maps a config onto it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoising import BlockDenoiser, PhaseHook
from .models.text_encoder import TextEncoder
from .models.vae import WAN21_VAE_ARCH, IdentityVAE, WanVAE, arch_strides
from .models.wan import WanModel
from .schedule import FlowMatchSchedule


def latent_size(vae, patch_size: tuple[int, int, int], height: int, width: int) -> tuple[int, int]:
    """Latent ``(h, w)`` of a ``height x width`` video: the decoder's own stride (the Wan VAE's 8 when there is no
    decoder), and whole DiT patches of ``patch_size``."""
    stride = vae.spatial_stride if vae is not None else arch_strides(WAN21_VAE_ARCH)[0]
    _, ph, pw = patch_size
    if height <= 0 or width <= 0 or height % (stride * ph) or width % (stride * pw):
        raise ValueError(f"height x width {height}x{width} must be positive multiples of {stride * ph} (the "
                         f"decoder's stride {stride} times the DiT patch)")
    return height // stride, width // stride


@dataclass(frozen=True)
class StreamSettings:
    """How the block loop runs (``configs/default.yaml``: ``schedule.*``, ``text.offload_text_encoder``,
    ``video.height`` / ``video.width``)."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp: bool = True  # map the steps through the shifted grid: [1000, 937.5, 833.33, 625]
    timestep_shift: float = 5.0
    context_noise: float = 0.0  # timestep of the cache-writing context pass
    context_pass: bool = True  # False: the cache keeps the last step's keys (4 forwards per block instead of 5)
    offload_text_encoder: bool = False  # the text encoder visits the generator's device only to encode
    height: int = 480  # default video size in pixels
    width: int = 832


class StreamingModels:
    """The models of a stream and the helpers around them; see the module docstring.

    generator: the causal student (its ``causal`` spec gives block size, window and sink).
    text_encoder: ``forward(prompts) -> [B, L, text_dim]`` (None: pass text-encoder output as ``context``).
    vae: decodes (and, for start media, encodes) latents; None: latents only, with the Wan VAE's stride 8.
    phase_hook: optional ``hook(name)`` called as each phase starts: ``"prepare_context"``, then per block
    ``"steps"``, ``"context"``, ``"decode"`` and ``"block_end"`` (the benchmark records timing marks with it).
    """

    def __init__(self, generator: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | IdentityVAE | None,
                 settings: StreamSettings = StreamSettings(), *, phase_hook: PhaseHook | None = None):
        self.generator, self.text_encoder, self.vae = generator.eval(), text_encoder, vae
        self.settings = settings
        self.schedule = FlowMatchSchedule(settings.timestep_shift)
        timesteps = self.schedule.denoising_timesteps(list(settings.denoising_steps), settings.warp)
        self.denoiser = BlockDenoiser(generator, self.schedule, timesteps, context_noise=settings.context_noise,
                                      context_pass=settings.context_pass, phase_hook=phase_hook)

    @property
    def device(self) -> torch.device:
        return self.generator.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

    @property
    def height(self) -> int:
        return self.settings.height

    @property
    def width(self) -> int:
        return self.settings.width

    @property
    def timesteps(self) -> list[float]:
        return self.denoiser.timesteps

    @property
    def frames_per_block(self) -> int:
        return self.generator.causal.frames_per_block

    @property
    def phase_hook(self) -> PhaseHook | None:
        return self.denoiser.phase_hook

    @phase_hook.setter
    def phase_hook(self, hook: PhaseHook | None) -> None:
        self.denoiser.phase_hook = hook

    def phase(self, name: str) -> None:
        """Call the phase hook, if any."""
        if self.denoiser.phase_hook is not None:
            self.denoiser.phase_hook(name)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(h, w)`` of a ``height x width`` video (see :func:`latent_size`)."""
        return latent_size(self.vae, self.generator.config.patch_size, height, width)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder output ``[B, L, text_dim]`` on the generator's device and dtype.

        With ``offload_text_encoder`` the encoder lives on the CPU and visits the generator's device only to
        encode (umt5-xxl is ~11 GB in bf16: parking it keeps peak GPU memory to the DiT, caches and VAE).
        """
        if self.text_encoder is None:
            raise RuntimeError("this pipeline has no text encoder: pass context= instead of prompts")
        offload = self.settings.offload_text_encoder
        if offload:
            self.text_encoder.to(self.device)
        try:
            context = self.text_encoder(list(prompts))
        finally:
            if offload:
                self.text_encoder.to("cpu")
        return context.to(device=self.device, dtype=self.dtype)
