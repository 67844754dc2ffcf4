"""StreamingPipeline: prompt -> latent blocks -> decoded frames, block by block.

Per block of ``frames_per_block`` latent frames (spec 3.4):

1. few-step denoising at the warped timesteps ``[1000, 937.5, 833.3, 625]``: predict x0, re-noise it to the
   next step's sigma with fresh Gaussian noise, repeat; the block is the last x0;
2. the **context pass**: one more forward on the clean block at ``t = context_noise`` (0), whose only job is
   to overwrite the block's KV-cache slots with clean keys/values (its output is discarded);
3. streaming VAE decode of the block (the causal feature cache carries over): the first block gives
   ``1 + 4 (f - 1)`` frames (9 for 3-frame blocks), every later one ``4 f`` (12).

Latents are in the pipeline layout ``[B, F, C, h, w]``; decoded frames are ``[B, n, 3, H, W]`` in [-1, 1].
KV cache and cross-attention K/V are allocated once and reset per prompt batch.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable

import torch

from .config import Config
from .models.kv_cache import KVCache
from .models.text_encoder import TextEncoder
from .models.vae import WanVAE
from .models.wan import TextContext, WanModel
from .schedule import FlowMatchSchedule

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass
class StreamChunk:
    """One generated block."""

    index: int  # block number
    latents: torch.Tensor  # [B, f, C, h, w] clean latents of the block
    frames: torch.Tensor | None  # [B, n, 3, H, W] decoded frames in [-1, 1] (None when decode=False)


def _bfchw(x: torch.Tensor) -> torch.Tensor:
    """Pipeline layout [B, F, C, H, W] <-> DiT layout [B, C, F, H, W] (the permute is its own inverse)."""
    return x.permute(0, 2, 1, 3, 4)


class StreamingPipeline:
    """Streaming text-to-video with a causal Wan student, a text encoder and the Wan VAE."""

    def __init__(self, generator: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None, *,
                 denoising_steps: Iterable[float] = (1000.0, 750.0, 500.0, 250.0), warp: bool = True,
                 timestep_shift: float = 5.0, context_noise: float = 0.0, offload_text_encoder: bool = False):
        self.generator, self.text_encoder, self.vae = generator.eval(), text_encoder, vae
        self.schedule = FlowMatchSchedule(timestep_shift)
        steps = list(denoising_steps)
        self.timesteps = self.schedule.warp(steps) if warp else [float(s) for s in steps]
        self.context_noise = float(context_noise)
        self.offload_text_encoder = offload_text_encoder
        self._cache: KVCache | None = None  # self-attention KV cache, reset per prompt batch
        self._text: TextContext | None = None  # cross-attention K/V, overwritten per prompt batch

    @classmethod
    def from_config(cls, cfg: Config, *, checkpoint=None, use_ema: bool = False, device="cpu",
                    dtype=torch.float32, text_encoder_device=None) -> "StreamingPipeline":
        """Build every model the config names (tiny random ones for ``configs/tiny.yaml``)."""
        from .build import build_inference_generator, build_text_encoder, build_vae

        generator = build_inference_generator(cfg, checkpoint=checkpoint, use_ema=use_ema, device=device,
                                              dtype=dtype)
        text_device = text_encoder_device or ("cpu" if cfg.text.offload_text_encoder else device)
        text_encoder = build_text_encoder(cfg, device=text_device, dtype=dtype)
        vae = build_vae(cfg, device=device, dtype=dtype)
        return cls(generator, text_encoder, vae, denoising_steps=cfg.schedule.denoising_step_list,
                   warp=cfg.schedule.warp_denoising_step, timestep_shift=cfg.schedule.timestep_shift,
                   context_noise=cfg.schedule.context_noise, offload_text_encoder=cfg.text.offload_text_encoder)

    # ------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.generator.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.patch_embedding.weight.dtype

    @property
    def frames_per_block(self) -> int:
        return self.generator.causal.frames_per_block

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

    def _kv_cache(self, batch: int, height: int, width: int, num_frames: int) -> KVCache:
        """Reuse the cache across prompts (reset only); reallocate when the batch or geometry changes."""
        tokens = self.generator.tokens_per_frame(height, width)
        c = self._cache
        if (c is None or c.batch_size != batch or c.frame_tokens != tokens or c.k.dtype != self.dtype
                or c.k.device != self.device or (not c.wraps and c.capacity < num_frames)):
            c = self._cache = self.generator.new_kv_cache(batch, height, width, max_frames=num_frames)
        c.reset()
        return c

    @staticmethod
    def _gaussian(generator: torch.Generator) -> NoiseSource:
        # Drawn on the CPU so a seed gives the same video on every device.
        return lambda shape: torch.randn(shape, generator=generator)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Host tensors reach a GPU through pinned memory without blocking: a plain ``.to(cuda)`` from pageable
        memory waits for the GPU queue to drain, a bubble on every re-noising draw. Same values either way."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.pin_memory().to(self.device, dtype=self.dtype, non_blocking=True)
        return x.to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def stream(self, prompts: str | list[str] | None = None, *, num_frames: int = 21, height: int = 480,
               width: int = 832, seed: int = 0, context: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, renoise: Iterable[torch.Tensor] | NoiseSource | None = None,
               decode: bool = True) -> Iterator[StreamChunk]:
        """Generate ``num_frames`` latent frames block by block, yielding each decoded block as it is ready.

        prompts: one prompt or a batch; or pass ``context`` (text-encoder output ``[B, L, text_dim]``).
        height, width: video size in pixels (latents are 8x smaller).
        seed: seeds the initial noise and every re-noising draw (CPU generator: same video on any device).
        noise: optional initial noise ``[B, num_frames, C, h, w]``; renoise: optional iterable of the
        re-noising draws (any shape with the block's element count, e.g. the reference's ``[B*f, C, h, w]``)
        or a callable ``shape -> tensor``. Both exist so a test can replay a recorded run.

        One stream at a time per pipeline: the KV and cross-attention caches are shared and reset by the next
        ``stream()`` call (use a second pipeline over the same models for concurrent streams).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (context is None):
            raise ValueError("pass exactly one of prompts or context")
        block = self.frames_per_block
        if num_frames <= 0 or num_frames % block:
            raise ValueError(f"num_frames={num_frames} latent frames must be a positive multiple of the "
                             f"{block}-frame block (e.g. 21 for 81 video frames, 120 for 477)")
        if height % 16 or width % 16:
            raise ValueError(f"height x width {height}x{width} must be multiples of 16")
        if decode and self.vae is None:
            raise RuntimeError("this pipeline has no VAE: call with decode=False")

        if context is None:
            context = self.encode_prompts(prompts)
        context = context.to(device=self.device, dtype=self.dtype)
        batch = context.shape[0]
        h, w = height // 8, width // 8
        channels = self.generator.config.in_dim

        rng = torch.Generator().manual_seed(seed)
        draw = self._gaussian(rng)
        if noise is None:
            noise = draw((batch, num_frames, channels, h, w))
        if tuple(noise.shape) != (batch, num_frames, channels, h, w):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, num_frames, channels, h, w)}")
        if renoise is None:
            renoise = draw
        elif not callable(renoise):
            draws = iter(renoise)
            renoise = lambda shape: next(draws)  # noqa: E731

        text = self._text = self.generator.prepare_context(context, out=self._text)
        cache = self._kv_cache(batch, h, w, num_frames)
        decoder = self.vae.stream_decoder() if decode else None
        for index, start in enumerate(range(0, num_frames, block)):
            latents = self.denoise_block(self._to_device(noise[:, start:start + block]), text, cache, start, renoise)
            frames = decoder.decode(latents.to(self.vae.dtype)) if decoder is not None else None
            yield StreamChunk(index, latents, frames)

    def denoise_block(self, x: torch.Tensor, text, cache: KVCache, start: int, renoise: NoiseSource) -> torch.Tensor:
        """Few-step denoising of one block ``x [B, f, C, h, w]`` (pure noise), then the context pass."""
        batch, frames = x.shape[:2]
        x0 = x
        for k, t in enumerate(self.timesteps):
            timestep = torch.full((batch, frames), t, device=self.device, dtype=torch.float32)
            flow = _bfchw(self.generator(_bfchw(x), timestep, text, kv_cache=cache, start_frame=start))
            x0 = self.schedule.flow_to_x0(flow, x, timestep)
            if k + 1 < len(self.timesteps):
                eps = self._to_device(renoise(tuple(x0.shape)).reshape(x0.shape))
                x = self.schedule.add_noise(x0, eps, torch.full((batch, frames), self.timesteps[k + 1],
                                                                 device=self.device))
        clean = x0
        if self.context_noise > 0:  # the reference adds none at inference (context_noise 0)
            clean = self.schedule.add_noise(x0, self._to_device(renoise(tuple(x0.shape)).reshape(x0.shape)),
                                            torch.full((batch, frames), self.context_noise, device=self.device))
        timestep = torch.full((batch, frames), self.context_noise, device=self.device, dtype=torch.float32)
        self.generator(_bfchw(clean), timestep, text, kv_cache=cache, start_frame=start)
        return x0

    @torch.no_grad()
    def generate(self, prompts=None, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run :meth:`stream` to the end; returns ``(frames [B, T, 3, H, W] or None, latents [B, F, C, h, w])``."""
        chunks = list(self.stream(prompts, **kwargs))
        latents = torch.cat([c.latents for c in chunks], dim=1)
        frames = torch.cat([c.frames for c in chunks], dim=1) if chunks[0].frames is not None else None
        return frames, latents
