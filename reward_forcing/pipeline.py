"""StreamingPipeline: prompt -> latent blocks -> decoded frames, block by block.

:meth:`StreamingPipeline.stream` is a loop over a :class:`~reward_forcing.interactive.session.Session` with no
events. Per block of ``frames_per_block`` latent frames: :class:`~reward_forcing.denoising.BlockDenoiser` runs
the few-step denoising and the cache-writing context pass (the one block loop, shared with training), then the
streaming VAE decoder turns the block into pixels (its causal feature cache carries over): the first block
gives ``1 + 4 (f - 1)`` frames (9 for 3-frame blocks), every later one ``4 f`` (12).

Latents are in the pipeline layout ``[B, F, C, h, w]``; decoded frames are ``[B, n, 3, H, W]`` in [-1, 1].
Each stream's session allocates its KV cache and cross-attention K/V (on a GPU the caching allocator hands the
previous stream's memory back). Build a pipeline from a config with :func:`reward_forcing.build.build_pipeline`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .denoising import NoiseSource, cpu_gaussian
from .interactive.session import Session
from .streaming import StreamingModels


@dataclass
class StreamChunk:
    """One generated block."""

    index: int  # block number
    latents: torch.Tensor  # [B, f, C, h, w] clean latents of the block
    frames: torch.Tensor | None  # [B, n, 3, H, W] decoded frames in [-1, 1] (None when decode=False)


class StreamingPipeline(StreamingModels):
    """Streaming text-to-video: :class:`~reward_forcing.streaming.StreamingModels` (a causal Wan student with its
    block loop, a text encoder, a decoder and the :class:`~reward_forcing.streaming.StreamSettings` of the loop)
    plus :meth:`stream` and :meth:`generate`.

    ``StreamingPipeline(generator, text_encoder, vae, settings)``; build one from a config with
    :func:`reward_forcing.build.build_pipeline`.
    """

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

        This is a loop over a :class:`~reward_forcing.interactive.session.Session` given the initial noise of the
        whole horizon (drawn first) and the same generator for the re-noising draws; the session checks the
        arguments and owns the caches.
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
        if context is None:
            context = self.encode_prompts(prompts)
        draw = cpu_gaussian(seed)
        if noise is None:
            noise = draw((context.shape[0], num_frames, self.generator.config.in_dim, *self.latent_size(height, width)))
        elif noise.dim() != 5 or noise.shape[1] != num_frames:  # the rest of its shape is the session's to check
            raise ValueError(f"noise has shape {tuple(noise.shape)}; it must hold num_frames={num_frames} latent "
                             "frames [B, num_frames, C, h, w]")
        if renoise is None:
            renoise = draw
        elif not callable(renoise):
            draws = iter(renoise)
            renoise = lambda shape: next(draws)  # noqa: E731
        session = Session(self, context=context, height=height, width=width, noise=noise, renoise=renoise,
                          max_frames=num_frames, decode=decode)
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
