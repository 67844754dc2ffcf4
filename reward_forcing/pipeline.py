"""StreamingPipeline: prompt -> latent blocks -> decoded frames, block by block.

:meth:`StreamingPipeline.stream` is a loop over a :class:`~reward_forcing.interactive.session.Session` with no
events. Per block of ``frames_per_block`` latent frames: :class:`~reward_forcing.denoising.BlockDenoiser` runs
the few-step denoising and the cache-writing context pass (the one block loop, shared with training), then the
streaming VAE decoder turns the block into pixels (its causal feature cache carries over): the first block
gives ``1 + 4 (f - 1)`` frames (9 for 3-frame blocks), every later one ``4 f`` (12).

Latents are in the pipeline layout ``[B, F, C, h, w]``; decoded frames are ``[B, n, 3, H, W]`` in [-1, 1].
KV cache and cross-attention K/V are allocated once and reset per prompt batch. Build a pipeline from a config
with :func:`reward_forcing.build.build_pipeline`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .denoising import BlockDenoiser, NoiseSource, PhaseHook, cpu_gaussian
from .interactive.session import Session
from .models.kv_cache import KVCache
from .models.text_encoder import TextEncoder
from .models.vae import WanVAE
from .models.wan import TextContext, WanModel
from .schedule import FlowMatchSchedule


@dataclass
class StreamChunk:
    """One generated block."""

    index: int  # block number
    latents: torch.Tensor  # [B, f, C, h, w] clean latents of the block
    frames: torch.Tensor | None  # [B, n, 3, H, W] decoded frames in [-1, 1] (None when decode=False)


class StreamingPipeline:
    """Streaming text-to-video with a causal Wan student, a text encoder and the Wan VAE.

    height, width: the default video size in pixels (a config's ``video.height`` / ``video.width``).
    phase_hook: optional ``hook(name)`` called as each phase starts: ``"prepare_context"`` once, then per block
    ``"steps"``, ``"context"``, ``"decode"`` and ``"block_end"`` (the benchmark records timing marks with it).
    """

    def __init__(self, generator: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None, *,
                 denoising_steps: Iterable[float] = (1000.0, 750.0, 500.0, 250.0), warp: bool = True,
                 timestep_shift: float = 5.0, context_noise: float = 0.0, context_pass: bool = True,
                 offload_text_encoder: bool = False, height: int = 480, width: int = 832,
                 phase_hook: PhaseHook | None = None):
        self.generator, self.text_encoder, self.vae = generator.eval(), text_encoder, vae
        self.schedule = FlowMatchSchedule(timestep_shift)
        timesteps = self.schedule.denoising_timesteps(list(denoising_steps), warp)
        self.denoiser = BlockDenoiser(generator, self.schedule, timesteps, context_noise=context_noise,
                                      context_pass=context_pass)
        self.offload_text_encoder = offload_text_encoder
        self.height, self.width = height, width
        self.phase_hook = phase_hook
        self.cache: KVCache | None = None  # self-attention KV cache, reset per prompt batch
        self._text: TextContext | None = None  # cross-attention K/V, overwritten per prompt batch

    # ------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.generator.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

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

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(h, w)`` of a ``height x width`` video: the VAE's stride (8), and whole DiT patches."""
        stride = self.vae.spatial_stride if self.vae is not None else 8
        _, ph, pw = self.generator.config.patch_size
        if height <= 0 or width <= 0 or height % (stride * ph) or width % (stride * pw):
            raise ValueError(f"height x width {height}x{width} must be positive multiples of {stride * ph}")
        return height // stride, width // stride

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder output ``[B, 512, text_dim]`` on the generator's device and dtype.

        With ``offload_text_encoder`` the encoder lives on the CPU and visits the generator's device only to
        encode (umt5-xxl is ~11 GB in bf16: parking it keeps peak GPU memory to the DiT, caches and VAE).
        """
        if self.text_encoder is None:
            raise RuntimeError("this pipeline has no text encoder: pass context= instead of prompts")
        if self.offload_text_encoder:
            self.text_encoder.to(self.device)
        try:
            context = self.text_encoder(list(prompts))
        finally:
            if self.offload_text_encoder:
                self.text_encoder.to("cpu")
        return context.to(device=self.device, dtype=self.dtype)

    def kv_cache(self, batch: int, height: int, width: int, num_frames: int) -> KVCache:
        """The pipeline's cache for latents ``height x width``, reset: reused across prompts, reallocated only
        when the batch, the geometry or the generator's attention pattern (``generator.causal``: window, sink,
        policy, alpha) changes."""
        tokens = self.generator.tokens_per_frame(height, width)
        c = self.cache
        if (c is None or c.batch_size != batch or c.frame_tokens != tokens or c.k.dtype != self.dtype
                or c.k.device != self.device or c.spec != self.generator.causal
                or (not c.wraps and c.capacity < num_frames)):
            c = self.cache = self.generator.new_kv_cache(batch, height, width, max_frames=num_frames)
        c.reset()
        return c

    # ------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def stream(self, prompts: str | list[str] | None = None, *, num_frames: int = 21, height: int | None = None,
               width: int | None = None, seed: int = 0, context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, renoise: Iterable[torch.Tensor] | NoiseSource | None = None,
               decode: bool = True) -> Iterator[StreamChunk]:
        """Generate ``num_frames`` latent frames block by block, yielding each decoded block as it is ready.

        prompts: one prompt or a batch; or pass ``context`` (text-encoder output ``[B, L, text_dim]``).
        height, width: video size in pixels (latents are 8x smaller); default: the pipeline's (its config's).
        seed: seeds the initial noise and every re-noising draw (CPU generator: same video on any device).
        noise: optional initial noise ``[B, num_frames, C, h, w]``; renoise: optional iterable of the
        re-noising draws (any shape with the block's element count, e.g. the reference's ``[B*f, C, h, w]``)
        or a callable ``shape -> tensor``. Both exist so a test can replay a recorded run.

        One stream at a time per pipeline: the KV and cross-attention caches are shared and reset by the next
        ``stream()`` call (use a second pipeline over the same models for concurrent streams).

        This is a loop over a :class:`~reward_forcing.interactive.session.Session` given the initial noise of the
        whole horizon (drawn first) and the same generator for the re-noising draws, and the pipeline's caches.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (context is None):
            raise ValueError("pass exactly one of prompts or context")
        block = self.frames_per_block
        if num_frames <= 0 or num_frames % block:
            raise ValueError(f"num_frames={num_frames} latent frames must be a positive multiple of the "
                             f"{block}-frame block (e.g. 21 for 81 video frames, 120 for 477)")
        height = self.height if height is None else height
        width = self.width if width is None else width
        h, w = self.latent_size(height, width)
        if decode and self.vae is None:
            raise RuntimeError("this pipeline has no VAE: call with decode=False")

        if context is None:
            context = self.encode_prompts(prompts)
        context = context.to(device=self.device, dtype=self.dtype)
        batch = context.shape[0]
        channels = self.generator.config.in_dim

        draw = cpu_gaussian(seed)
        if noise is None:
            noise = draw((batch, num_frames, channels, h, w))
        if tuple(noise.shape) != (batch, num_frames, channels, h, w):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, num_frames, channels, h, w)}")
        if renoise is None:
            renoise = draw
        elif not callable(renoise):
            draws = iter(renoise)
            renoise = lambda shape: next(draws)  # noqa: E731

        session = Session(self, context=context, height=height, width=width, noise=noise, renoise=renoise,
                          cache=self.kv_cache(batch, h, w, num_frames), text_buffer=self._text,
                          max_frames=num_frames, decode=decode)
        self._text = session.text_context  # reused by the next stream
        for _ in range(num_frames // block):
            out = session.next_block()
            yield StreamChunk(out.index, out.latents, out.frames)

    @torch.no_grad()
    def generate(self, prompts=None, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run :meth:`stream` to the end; returns ``(frames [B, T, 3, H, W] or None, latents [B, F, C, h, w])``."""
        chunks = list(self.stream(prompts, **kwargs))
        latents = torch.cat([c.latents for c in chunks], dim=1)
        frames = torch.cat([c.frames for c in chunks], dim=1) if chunks[0].frames is not None else None
        return frames, latents
