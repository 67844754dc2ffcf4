"""A live, steerable stream: the one block loop with state that survives between calls.

:class:`Session` keeps the KV cache (window + EMA sink), the cross-attention K/V, the noise generator and the
streaming VAE decoder across :meth:`Session.next_block` calls, so it can generate indefinitely (memory is
bounded by the cache window) while prompts, seeds and the sink alpha change at block boundaries. It runs the
pipeline's :class:`~reward_forcing.denoising.BlockDenoiser` - the same loop as training - and owns only the
bookkeeping around it. ``StreamingPipeline.stream()`` is a loop over a session with no events: everything that
generates at inference goes through :meth:`Session.next_block`.

Determinism: a session is ``(seed, first prompt, start media, events)``. Every action becomes an event stamped
with the block before which it is applied (``session.events``); a fresh session given the same arguments and
``events=session.events`` produces bit-identical latents.

Noise: by default it is drawn block by block from a seeded CPU generator (the block's initial noise, then its
re-noising draws), so a session needs no horizon. ``noise=`` gives instead the initial noise of a whole horizon
up front (block ``i`` takes its frames ``[i f, (i + 1) f)``) and ``renoise=`` the source of the re-noising
draws. That reproduces ``stream()``'s draw order - all initial noise first, then the re-noising draws from the
same generator - which is how ``stream()`` drives its session.

Prompt-switch policies (docs/interactive.md has the table):

* ``cross``: only the cross-attention K/V change; window and sink keep the keys written under the old prompt.
* ``recache``: the clean latents of the window's frames (kept by the session; the cache holds keys, not
  frames) are re-encoded under the new prompt in one forward at t = 0, like the context pass, and overwrite
  their own slots; the sink is untouched.
* ``recache_sink``: a scene cut: the cache is emptied and the same frames are written back as a new video, so
  the first ``sink_size`` of them re-seed the sink. (The EMA sink is a mixture of keys, not of frames: it
  cannot be re-encoded, only replaced.)
* ``reset``: a new video (new epoch): empty caches, a fresh VAE decoder.

Independent of the policy, ``blend_blocks = N`` moves the text embedding linearly from the one in effect to
the new prompt's over N blocks (the first block after the switch already uses 1/N of the new prompt).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..denoising import NoiseSource, cpu_gaussian, to_device
from ..models.kv_cache import KVCache
from ..models.wan import TextContext
from ..streaming import StreamingModels
from .events import Event, Reset, SetPrompt, SetSeed, SetSinkAlpha

_TEXT_CACHE_SIZE = 8  # encoded prompts kept (switching back and forth does not re-run the text encoder)


@dataclass
class SessionBlock:
    """One generated block of a session."""

    index: int  # block number over the whole session (the clock events are stamped with)
    epoch: int  # video number: 0, then +1 at every reset
    epoch_block: int  # block number inside the epoch
    latents: torch.Tensor  # [B, f, C, h, w] clean latents
    frames: torch.Tensor | None  # [B, n, 3, H, W] in [-1, 1]; None when the session does not decode
    prompt: str | None  # the prompt in effect (the target, while a blend is under way); None: given context
    events: list[Event]  # events applied just before this block


class Session:
    """A stateful stream over a ``StreamingPipeline``; see the module docstring.

    models: a :class:`~reward_forcing.streaming.StreamingModels` (a ``StreamingPipeline`` is one): the generator
      and its block loop, the text encoder, the decoder, and their helpers. The session owns its KV cache,
      cross-attention K/V and noise; nothing of it is handed back.

    prompt: the first prompt; or ``context``: text-encoder output ``[B, L, text_dim]`` (a batch of B streams).
      Events that carry a prompt encode it once and give it to all B streams.
    seed: seeds the CPU noise generator.
    height, width: pixel size (default: the pipeline's).
    image: optional start image, pixels ``[3, H, W]`` in [-1, 1] at the video size (see ``media.fit_frames``):
      repeated over the first block's pixel frames, encoded, and written into the cache as the first block (it
      seeds the sink); it is not part of the output. Batch 1 only.
    video: optional video to continue, pixels ``[T, 3, H, W]`` in [-1, 1]: see :meth:`_write_video`. Batch 1 only.
    events: events to apply at their blocks (a timeline, or another session's ``events`` to replay it).
    sink_alpha: EMA-sink decay (default: the cache's ``causal.ema_alpha``).
    max_frames: cache length for global-attention generators (``local_attn_size = -1``), which keep every frame.
    decode: decode blocks to pixels with a streaming decoder.
    decoder_model: what decodes, anything with ``stream_decoder()`` and ``dtype``: the pipeline's Wan VAE by
      default, or e.g. a :class:`~reward_forcing.models.taehv.TAEHVDecoder` for fast previews.
    noise: optional initial noise ``[B, F, C, h, w]`` for a horizon of ``F / f`` blocks: block ``i`` starts from
      frames ``[i f, (i + 1) f)`` (a block past the horizon is an error). Default: drawn per block.
    renoise: optional ``shape -> tensor`` source of the re-noising draws (and of the per-block initial noise when
      ``noise`` is not given), in place of the seed's generator; ``set_seed`` / a reset with a seed replace it.

    Phases: through the models' ``phase_hook``, ``"prepare_context"`` fires whenever the cross-attention K/V
    are computed (once here, then at prompt switches and blend steps), and per block ``"steps"``, ``"context"``
    (in the denoiser), ``"decode"`` (when decoding) and ``"block_end"``.

    Sessions over the same models may be interleaved on one thread (each owns its caches); the models themselves
    are shared, so not from two threads at once.
    """

    @torch.no_grad()
    def __init__(self, models: StreamingModels, prompt: str | None = None, *, context: torch.Tensor | None = None,
                 seed: int = 0, height: int | None = None, width: int | None = None,
                 image: torch.Tensor | None = None, video: torch.Tensor | None = None, events: Iterable[Event] = (),
                 sink_alpha: float | None = None, max_frames: int | None = None, decode: bool = True,
                 decoder_model=None, noise: torch.Tensor | None = None, renoise: NoiseSource | None = None):
        if (prompt is None) == (context is None):
            raise ValueError("pass exactly one of prompt or context")
        if image is not None and video is not None:
            raise ValueError("start from an image or from a video, not both")
        self.models = models
        decoder_model = decoder_model if decoder_model is not None else models.vae
        if decode and decoder_model is None:
            raise ValueError("this pipeline has no VAE: create the session with decode=False")
        self.height = models.height if height is None else height
        self.width = models.width if width is None else width
        self.latent_hw = models.latent_size(self.height, self.width)
        generator = models.generator
        if context is not None:
            if context.dim() != 3:
                raise ValueError(f"context must be text-encoder output [B, L, text_dim], got {tuple(context.shape)}")
            context = context.to(device=models.device, dtype=models.dtype)
        self.batch = 1 if context is None else context.shape[0]
        if self.batch > 1 and (image is not None or video is not None):
            raise ValueError(f"a start image or video begins one stream, not a batch of {self.batch}: "
                             "pass a context with one row")
        f, channels = models.frames_per_block, generator.config.in_dim
        if noise is not None and (noise.dim() != 5 or noise.shape[1] == 0 or noise.shape[1] % f
                                  or (noise.shape[0], *noise.shape[2:]) != (self.batch, channels, *self.latent_hw)):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [{self.batch}, a multiple of {f}, "
                             f"{channels}, {self.latent_hw[0]}, {self.latent_hw[1]}]")
        self._noise = noise
        if generator.causal.local_attn_size == -1 and max_frames is None:
            raise ValueError("this generator attends to every past frame (local_attn_size=-1): pass max_frames")
        self.cache: KVCache = generator.new_kv_cache(self.batch, *self.latent_hw, max_frames=max_frames)
        cache = self.cache
        self.sink_alpha = cache.spec.ema_alpha
        if sink_alpha is not None:
            self._set_alpha(sink_alpha)
        self.decoder = decoder_model.stream_decoder() if decode else None
        self._decode_dtype = decoder_model.dtype if decode else None

        self.block = 0  # the next block's index
        self.epoch = -1
        self.epoch_block = 0
        self.events: list[Event] = []  # applied, stamped with the block they took effect at
        self._pending: list[Event] = sorted(events, key=lambda e: e.block)
        self._draw: NoiseSource = renoise if renoise is not None else cpu_gaussian(seed)
        self._encoded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prompt = prompt
        self._context = self._encode(prompt) if context is None else context  # in effect [B, L, text_dim]
        self._blend: tuple[torch.Tensor, torch.Tensor, int, int] | None = None  # (from, to, first block, N)
        self._text: TextContext | None = None  # cross-attention K/V, written in place per prompt
        self._text_dirty = True
        self._latents: dict[int, torch.Tensor] = {}  # clean latents [B, 1, C, h, w] of the frames in the cache
        self._frame = 0  # next cache frame index (restarts with the cache)
        self._new_video(image=image)
        if video is not None:
            self._write_video(video)
        self._text_for_block()  # the first prompt's cross-attention K/V, ready before the first block

    # ----------------------------------------------------------------------------------- live actions
    def add_event(self, event: Event) -> None:
        """Apply ``event`` before block ``event.block`` (or before the next block, if that one has passed)."""
        self._pending.append(event)
        self._pending.sort(key=lambda e: e.block)  # stable: same-block events keep their order

    def set_prompt(self, text: str, policy: str = "cross", blend_blocks: int = 0) -> SetPrompt:
        """Switch prompt before the next block, with a switch policy and an optional blend over N blocks."""
        event = SetPrompt(self.block, text, policy, blend_blocks)
        self.add_event(event)
        return event

    def set_seed(self, seed: int) -> SetSeed:
        event = SetSeed(self.block, seed)
        self.add_event(event)
        return event

    def reset(self, prompt: str | None = None, seed: int | None = None, image: torch.Tensor | None = None) -> Reset:
        """Start a new video before the next block (optionally with a new prompt, seed or start image)."""
        event = Reset(self.block, prompt, seed, image)
        self.add_event(event)
        return event

    def set_sink_alpha(self, alpha: float) -> SetSinkAlpha:
        event = SetSinkAlpha(self.block, alpha)
        self.add_event(event)
        return event

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def next_block(self) -> SessionBlock:
        """Apply the events due, then denoise, cache and decode one block."""
        models, f = self.models, self.models.frames_per_block
        if self._noise is not None and (self.block + 1) * f > self._noise.shape[1]:
            raise ValueError(f"the session's noise covers {self._noise.shape[1] // f} blocks; block {self.block} "
                             "has none (pass a longer noise=, or none to draw per block)")
        applied = self._apply_due_events()
        text = self._text_for_block()
        if self._noise is not None:
            noise = self._noise[:, self.block * f:(self.block + 1) * f]
        else:
            noise = self._draw((self.batch, f, models.generator.config.in_dim, *self.latent_hw))
        x = to_device(noise, models.device, models.dtype)
        latents = models.denoiser.denoise_block(x, text, self.cache, self._frame, self._draw)
        self._keep(latents, self._frame)
        self._frame += f
        frames = None
        if self.decoder is not None:
            self._phase("decode")
            frames = self.decoder.decode(latents.to(self._decode_dtype))
        self._phase("block_end")
        out = SessionBlock(self.block, self.epoch, self.epoch_block, latents, frames, self.prompt, applied)
        self.block += 1
        self.epoch_block += 1
        return out

    def blocks(self, n: int) -> list[SessionBlock]:
        return [self.next_block() for _ in range(n)]

    # ----------------------------------------------------------------------------------- internals
    @torch.no_grad()
    def _apply_due_events(self) -> list[Event]:
        """Apply the events due before the next block (``next_block`` starts with this); returns them."""
        applied = []
        while self._pending and self._pending[0].block <= self.block:
            event = dataclasses.replace(self._pending.pop(0), block=self.block)
            if isinstance(event, SetPrompt):
                self._switch_prompt(event)
            elif isinstance(event, SetSeed):
                self._draw = cpu_gaussian(event.seed)
            elif isinstance(event, SetSinkAlpha):
                self._set_alpha(event.alpha)
            elif isinstance(event, Reset):
                if event.seed is not None:
                    self._draw = cpu_gaussian(event.seed)
                if event.text is not None:
                    self._set_context(event.text, self._encode(event.text))
                self._new_video(image=event.image)
            else:
                raise TypeError(f"not a session event: {event!r}")
            self.events.append(event)
            applied.append(event)
        return applied

    def _phase(self, name: str) -> None:
        self.models.phase(name)

    def _encode(self, text: str) -> torch.Tensor:
        """Text-encoder output of ``text`` for every stream of the batch ``[B, L, text_dim]``."""
        if text in self._encoded:
            self._encoded.move_to_end(text)
        else:
            self._encoded[text] = self.models.encode_prompts([text])
            if len(self._encoded) > _TEXT_CACHE_SIZE:
                self._encoded.popitem(last=False)
        context = self._encoded[text]
        return context if context.shape[0] == self.batch else context.expand(self.batch, -1, -1)

    def _set_context(self, text: str, context: torch.Tensor) -> None:
        self.prompt, self._context, self._blend, self._text_dirty = text, context, None, True

    @torch.no_grad()
    def _text_for_block(self):
        """Cross-attention K/V for the next block: the prompt's, or a point on the blend."""
        if self._blend is not None:
            source, target, first, n = self._blend
            weight = min(1.0, (self.block - first + 1) / n)
            self._context = target if weight >= 1.0 else torch.lerp(source, target, weight)
            self._blend = None if weight >= 1.0 else self._blend
            self._text_dirty = True
        if self._text_dirty:
            self._phase("prepare_context")
            self._text = self.models.generator.prepare_context(self._context, out=self._text)
            self._text_dirty = False
        return self._text

    def _set_alpha(self, alpha: float) -> None:
        self.cache.spec = dataclasses.replace(self.cache.spec, ema_alpha=float(alpha))  # validates
        self.sink_alpha = float(alpha)

    def _keep(self, latents: torch.Tensor, start: int) -> None:
        """Remember the clean latents of the frames just written; forget the ones the cache evicted."""
        for i in range(latents.shape[1]):
            self._latents[start + i] = latents[:, i:i + 1]
        held = set(self.cache.slot_frame)
        for frame in [a for a in self._latents if a not in held]:
            del self._latents[frame]

    def _window_frames(self) -> list[int]:
        """Frames in the cache's ring slots (not the sink), oldest first."""
        return sorted(self.cache.slot_frame[self.cache.sink:])

    def _switch_prompt(self, event: SetPrompt) -> None:
        """The switch policies, all in one place (module docstring; docs/interactive.md)."""
        target = self._encode(event.text)
        source = self._context
        if event.blend_blocks > 1 and source.shape != target.shape:
            raise ValueError(f"cannot blend the context in effect {tuple(source.shape)} into the prompt's "
                             f"{tuple(target.shape)}: switch with blend_blocks=0")
        self.prompt = event.text
        if event.blend_blocks > 1:
            self._blend = (source, target, self.block, event.blend_blocks)
        else:
            self._set_context(event.text, target)
        if event.policy == "cross":
            return
        if event.policy == "reset":
            self._new_video()
            return
        text = self._text_for_block()  # the new prompt (the blend's first step) encodes the window
        window = self._window_frames()
        if event.policy == "recache":
            if window:  # before the first eviction of a sink frame the window may be empty: nothing to redo
                self.cache.reopen(window[0])
                self._write(window, text, window[0])
            return
        # recache_sink: the same frames, written back as a new video; the first sink_size of them are the sink
        frames = window or sorted(self._latents)
        clean = torch.cat([self._latents[a] for a in frames], dim=1)
        self.cache.reset()
        self._latents = {}
        self._write(clean, text, 0)
        self._frame = clean.shape[1]

    def _write(self, frames: list[int] | torch.Tensor, text, start: int) -> None:
        """One context pass writing clean latents (or the kept latents of ``frames``) at cache frames ``start,
        start + 1, ...``: one forward at t = 0 that overwrites their keys/values."""
        clean = frames if isinstance(frames, torch.Tensor) else torch.cat([self._latents[a] for a in frames], 1)
        self.models.denoiser.context_pass(clean, text, self.cache, start, self._draw)
        self._keep(clean, start)

    def _new_video(self, image: torch.Tensor | None = None) -> None:
        """Empty the caches and start a new epoch, optionally from a start image."""
        self.cache.reset()
        self._latents, self._frame = {}, 0
        if self.decoder is not None:
            self.decoder.reset()
        self.epoch += 1
        self.epoch_block = 0
        if image is not None:
            if self.batch > 1:
                raise ValueError(f"a start image begins one stream, not a batch of {self.batch}")
            if image.dim() != 3 or tuple(image.shape) != (3, self.height, self.width):
                raise ValueError(f"start image must be pixels [3, {self.height}, {self.width}], "
                                 f"got {tuple(image.shape)}")
            frames = self.models.vae.video_frames(self.models.frames_per_block)  # 9 pixel frames -> one block
            self._write_latents(self.models.vae.encode(image[None, None].expand(1, frames, -1, -1, -1)))

    def _write_video(self, video: torch.Tensor) -> None:
        """Continue ``video [T, 3, H, W]``: the cache is filled as if the model had generated it.

        The whole video is encoded (its last ``1 + 4k`` frames, so the newest frame is kept); the sink is seeded
        with its first ``sink_size`` latent frames and the window gets its last ones. That is the cache a
        generated video leaves behind: an EMA sink with alpha ~1 still holds mostly the first frames written,
        while the window holds the most recent ones, which the continuation must join smoothly.
        """
        if video.dim() != 4 or tuple(video.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"video must be pixels [T, 3, {self.height}, {self.width}], got {tuple(video.shape)}")
        stride = self.models.vae.temporal_stride
        usable = 1 + (video.shape[0] - 1) // stride * stride
        latents = self.models.vae.encode(video[-usable:][None])
        cache = self.cache
        if cache.wraps and latents.shape[1] > cache.capacity:
            latents = torch.cat([latents[:, :cache.sink], latents[:, -(cache.capacity - cache.sink):]], dim=1)
        self._write_latents(latents)

    def _write_latents(self, latents: torch.Tensor) -> None:
        """Write clean latents ``[1, F, C, h, w]`` into the empty cache block by block (block-causal, exactly
        as generation writes them) under the current prompt, and prime the VAE decoder on the last block."""
        f = self.models.frames_per_block
        latents = latents.to(self.models.device, self.models.dtype)
        text = self._text_for_block()
        for start in range(0, latents.shape[1], f):
            block = latents[:, start:start + f]
            self.models.denoiser.context_pass(block, text, self.cache, start, self._draw)
            self._keep(block, start)
        self._frame = latents.shape[1]
        if self.decoder is not None:  # continuity: the decoder's causal state ends on the start media
            self.decoder.decode(latents[:, -f:].to(self._decode_dtype))
