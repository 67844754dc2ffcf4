"""The streaming KV cache: a sliding window of past frames plus a sink, with a pluggable sink policy.

What is stored
--------------
One key and one value buffer for all layers, ``[layers, B, capacity_frames * tokens_per_frame, heads,
head_dim]``. Keys are stored **after** the q/k RMSNorm and **before** RoPE: RoPE is re-applied on every call
with *window-relative* frame positions (spec 2.3-2.4), which keeps positions bounded for arbitrarily long
videos.

Slots (frames)
--------------
``capacity = local_attn_size`` frames (or ``max_frames`` for global attention, ``local_attn_size = -1``).
The first ``S`` slots are the **sink** and hold frames ``0..S-1`` (the sink is initialised from the first
frames written, as in the reference). The remaining ``W = capacity - S`` slots are a **ring**: frame ``a >= S``
lives in slot ``S + (a - S) % W``. A new chunk therefore overwrites exactly the oldest non-sink frames - the
frames the reference evicts by rolling its buffer (spec 2.5, after the "[fix] ema sink" commit) - without
copying the window. Attention does not depend on key order, so keys are read in slot order and each slot gets
the RoPE position of its frame's *rank* among the frames held (sink first, then the window oldest to newest);
queries get the last positions. This equals the reference's "keys 0..n-1 in buffer order, queries n-N..n-1".

Sink policies (``CausalSpec.sink_policy``)
------------------------------------------
* ``none``: no sink; a plain sliding window of ``local_attn_size`` frames (``sink_size`` is ignored).
* ``static``: the first ``sink_size`` frames are kept verbatim; evicted frames are dropped. This is also what
  the reference *trains* with (its training cache never evicts, so its sink is never updated).
* ``ema``: every evicted frame is folded into the sink, ``sink <- alpha * sink + (1 - alpha) * evicted``
  (alpha 0.999 in the reference), frame ``a`` into sink frame ``(a - S) % S``, in eviction order.
  With the shipped geometry (3-frame chunks, 3-frame sink) this is exactly the reference: the 3 evicted frames
  of a chunk fuse token-by-token into the 3 sink frames. For other chunk sizes the reference is undefined
  (it overwrites sink tokens when ``evicted != sink``); this round-robin rule is ours and keeps every
  evicted token's contribution, one EMA step per evicted frame.

The EMA fires on the **first** call of a new chunk, before any layer attends, so that chunk already sees the
updated sink (reference behaviour). Repeated calls on the same chunk (denoising steps, the context pass)
overwrite the chunk's own slots and change nothing else.

Rotated keys (inference speed)
------------------------------
RoPE positions of the window only change when a new chunk starts, so with ``rotated_keys`` (the default) the
cache also keeps each layer's keys *after* RoPE: the first call of a chunk rotates the whole window once, the
repeated calls (later denoising steps, the context pass) rotate only the chunk's own keys. Every element goes
through the same arithmetic as rotating the whole window per call (outputs are bit-identical, tested), at the
cost of one more key buffer. ``rotated_keys=False`` rotates the whole window on every call.

Gradients
---------
With grad enabled (training rollouts, gradient checkpointing), a layer reads a *snapshot* of its past keys
taken before the block runs and the new keys are written after it (``commit``), so a checkpoint recompute
sees the same cache whatever order autograd recomputes blocks in (spec 2.8 describes the reference's
fragility here).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

SINK_POLICIES = ("none", "static", "ema")


@dataclass(frozen=True)
class CausalSpec:
    """How the causal student attends: chunk size, window, sink and sink policy (all in latent frames)."""

    frames_per_block: int = 3
    local_attn_size: int = 9
    sink_size: int = 3
    sink_policy: str = "ema"
    ema_alpha: float = 0.999

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.sink_policy not in SINK_POLICIES:
            raise ValueError(f"sink_policy {self.sink_policy!r} is not one of {SINK_POLICIES}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if self.local_attn_size != -1:
            need = self.sink_frames + self.frames_per_block
            if self.local_attn_size < need:
                raise ValueError(
                    f"local_attn_size={self.local_attn_size} frames cannot hold the sink ({self.sink_frames}) plus "
                    f"one chunk ({self.frames_per_block}); use local_attn_size >= {need} or -1 (global)")

    @property
    def sink_frames(self) -> int:
        """Frames actually kept as sink (0 for the ``none`` policy)."""
        return 0 if self.sink_policy == "none" else self.sink_size

    def with_policy(self, sink_policy: str) -> "CausalSpec":
        return replace(self, sink_policy=sink_policy)


def rank_positions(frames: Sequence[int]) -> dict[int, int]:
    """Window-relative RoPE position of each frame: its rank among the frames attended (sink first)."""
    return {frame: rank for rank, frame in enumerate(sorted(frames))}


@dataclass
class CacheStep:
    """Bookkeeping of one model call against the cache, shared by all layers (plain ints: no host syncs)."""

    start_frame: int
    num_frames: int
    new_chunk: bool
    chunk_slots: list[int]
    slot_frame: list[int]  # frame held by each valid slot after this call's write (a prefix of the buffer)
    evicted_frames: list[int] = field(default_factory=list)

    @property
    def valid_slots(self) -> int:
        return len(self.slot_frame)

    def __post_init__(self):
        # Computed once per call and shared by every layer. Plain attributes, not cached_property: its lock
        # (Python < 3.12) makes torch.compile break the graph.
        self.positions: dict[int, int] = rank_positions(self.slot_frame)
        self.query_positions: list[int] = [self.positions[a] for a in
                                           range(self.start_frame, self.start_frame + self.num_frames)]

    @property
    def past_slots(self) -> list[int]:
        chunk = set(self.chunk_slots)
        return [s for s in range(self.valid_slots) if s not in chunk]


class KVCache:
    """Self-attention K/V of all layers for one batch of streams; see the module docstring."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        frame_tokens: int,
        batch_size: int,
        spec: CausalSpec,
        max_frames: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rotated_keys: bool = True,
    ):
        self.spec = spec
        self.frame_tokens = int(frame_tokens)
        self.sink = spec.sink_frames
        if spec.local_attn_size == -1:
            if max_frames is None:
                raise ValueError("global attention (local_attn_size=-1) keeps every frame: pass max_frames")
            self.capacity = int(max_frames)
            self.wraps = False
        else:
            self.capacity = spec.local_attn_size
            self.wraps = True
        self.ring = self.capacity - self.sink
        shape = (num_layers, batch_size, self.capacity * self.frame_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_rotated = torch.zeros(shape, device=device, dtype=dtype) if rotated_keys else None
        self._rotated_current = [False] * num_layers  # k_rotated matches k at this chunk's positions
        self.reset()

    @classmethod
    def for_model(cls, model, *, batch_size: int, frame_tokens: int, spec: CausalSpec | None = None,
                  max_frames: int | None = None, device=None, dtype=None, rotated_keys: bool = True) -> "KVCache":
        """A cache shaped for ``model`` (a ``WanModel``); spec defaults to ``model.causal``."""
        ref = model.patch_embedding.weight
        return cls(num_layers=model.config.num_layers, num_heads=model.config.num_heads,
                   head_dim=model.config.head_dim, frame_tokens=frame_tokens, batch_size=batch_size,
                   spec=spec or model.causal, max_frames=max_frames,
                   device=device if device is not None else ref.device,
                   dtype=dtype if dtype is not None else ref.dtype, rotated_keys=rotated_keys)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every frame (start a new video). Buffers are not cleared: nothing reads an unwritten slot."""
        self.slot_frame: list[int] = []  # frame held by slot i, for the valid prefix of slots
        self.end_frame = 0  # one past the last frame written
        self.chunk_start = 0
        self.num_sink_updates = 0  # EMA folds per layer: one per chunk that evicted frames (4 for 21 frames)

    # ----------------------------------------------------------------------------------- bookkeeping
    def _slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        if not self.wraps and frame >= self.capacity:
            raise RuntimeError(
                f"global-attention KV cache holds {self.capacity} frames but frame {frame} was written; "
                f"allocate it with max_frames >= the video length")
        return self.sink + (frame - self.sink) % self.ring

    def begin(self, start_frame: int, num_frames: int) -> CacheStep:
        """Plan a call on frames ``[start_frame, start_frame + num_frames)``; evict and fold the sink if new.

        A call either continues the stream (``start_frame == end_frame``: a new chunk) or repeats the current
        chunk (same start and length: another denoising step or the context pass).
        """
        end = start_frame + num_frames
        if self.end_frame > 0 and start_frame == self.chunk_start and end == self.end_frame:
            slots = [self._slot(a) for a in range(start_frame, end)]
            return CacheStep(start_frame, num_frames, False, slots, list(self.slot_frame))
        if start_frame != self.end_frame:
            raise ValueError(
                f"KV cache expected a chunk starting at frame {self.end_frame} (next chunk) or a repeat of "
                f"frames [{self.chunk_start}, {self.end_frame}); got [{start_frame}, {end}). "
                f"Call reset() before a new video.")
        ring_frames = end - max(start_frame, self.sink)
        if ring_frames > self.ring:
            raise ValueError(f"a chunk with {ring_frames} non-sink frames does not fit the {self.ring}-frame "
                             f"window (local_attn_size {self.capacity} minus sink {self.sink})")
        slots = [self._slot(a) for a in range(start_frame, end)]
        evicted = []  # (frame, slot) pairs, oldest first
        for slot, frame in zip(slots, range(start_frame, end)):
            if slot < len(self.slot_frame):
                evicted.append((self.slot_frame[slot], slot))
                self.slot_frame[slot] = frame
            else:  # slots fill in order until the buffer is full
                assert slot == len(self.slot_frame), (slot, self.slot_frame)
                self.slot_frame.append(frame)
        if evicted and self.spec.sink_policy == "ema" and self.sink > 0:
            self._fold_into_sink(evicted)
        self.chunk_start, self.end_frame = start_frame, end
        return CacheStep(start_frame, num_frames, True, slots, list(self.slot_frame), [f for f, _ in evicted])

    def _tokens(self, slot: int) -> slice:
        return slice(slot * self.frame_tokens, (slot + 1) * self.frame_tokens)

    @torch.no_grad()
    def _fold_into_sink(self, evicted: list[tuple[int, int]]) -> None:
        """EMA-fold evicted (frame, slot) pairs - still in their slots: the new chunk is not written yet -
        into the sink, oldest first."""
        alpha = self.spec.ema_alpha
        for frame, slot in evicted:
            sink_slot = (frame - self.sink) % self.sink
            for buf in (self.k, self.v):
                sink, old = buf[:, :, self._tokens(sink_slot)], buf[:, :, self._tokens(slot)]
                sink.copy_(alpha * sink + (1 - alpha) * old)
        self.num_sink_updates += 1

    # --------------------------------------------------------------------------------- per layer
    def layer(self, index: int, step: CacheStep) -> "LayerKV":
        """The view of layer ``index`` for this call. Take it *outside* a checkpointed block."""
        if torch.is_grad_enabled():
            past = step.past_slots
            tok = self._token_index(past)
            return LayerKV(self, index, step, self.k[index].index_select(1, tok),
                           self.v[index].index_select(1, tok), [step.slot_frame[s] for s in past])
        return LayerKV(self, index, step)

    def _token_index(self, slots: Sequence[int]) -> torch.Tensor:
        base = torch.arange(self.frame_tokens, device=self.k.device)
        if not slots:
            return base[:0]
        return (torch.tensor(list(slots), device=self.k.device)[:, None] * self.frame_tokens + base).reshape(-1)

    def _write(self, index: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch {self.batch_size}, got a batch of {k.shape[0]}")
        self._write_chunk(self.k[index], step, k)
        self._write_chunk(self.v[index], step, v)

    def _write_chunk(self, buffer: torch.Tensor, step: CacheStep, values: torch.Tensor) -> None:
        """Write a chunk's tokens into its slots of one layer's buffer ``[B, tokens, heads, head_dim]``."""
        first, n = step.chunk_slots[0], len(step.chunk_slots)
        if step.chunk_slots == list(range(first, first + n)):
            buffer[:, first * self.frame_tokens:(first + n) * self.frame_tokens] = values
        else:  # the chunk wraps around the ring
            buffer.index_copy_(1, self._token_index(step.chunk_slots), values)

    def sink_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink keys/values of one layer, ``[B, S * tokens, heads, head_dim]`` (pre-RoPE keys)."""
        tokens = slice(0, self.sink * self.frame_tokens)
        return self.k[index][:, tokens], self.v[index][:, tokens]

    def window_frames(self) -> list[int]:
        """Frames currently attended, in position order (sink first)."""
        return sorted(self.slot_frame)


class LayerKV:
    """One layer's access to the cache during one call.

    ``attend(k_new, v_new, rotate)`` returns the keys (RoPE applied by ``rotate(keys, frame_positions)``) and
    values to attend to. Without grad the new entries are written in place and the valid buffer prefix is
    used; with grad the keys are ``[snapshot of past, new]`` and the write waits for ``commit``.
    """

    def __init__(self, cache: KVCache, index: int, step: CacheStep, past_k=None, past_v=None, past_frames=None):
        self.cache, self.index, self.step = cache, index, step
        self.past_k, self.past_v, self.past_frames = past_k, past_v, past_frames
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def attend(self, k: torch.Tensor, v: torch.Tensor, rotate: Callable[[torch.Tensor, list[int]], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        step, cache, i = self.step, self.cache, self.index
        pos = step.positions
        if self.past_k is None:
            cache._write(i, step, k, v)
            n = step.valid_slots * cache.frame_tokens
            slot_positions = [pos[a] for a in step.slot_frame]
            if cache.k_rotated is None:
                return rotate(cache.k[i][:, :n], slot_positions), cache.v[i][:, :n]
            if step.new_chunk or not cache._rotated_current[i]:
                # positions moved, the sink was folded, or a grad-enabled call wrote k only: rotate the window
                cache.k_rotated[i][:, :n] = rotate(cache.k[i][:, :n], slot_positions)
                cache._rotated_current[i] = True
            else:  # same positions as the chunk's first call: only the chunk's own keys changed
                cache._write_chunk(cache.k_rotated[i], step, rotate(k, step.query_positions))
            return cache.k_rotated[i][:, :n], cache.v[i][:, :n]
        self.pending = (k.detach(), v.detach())
        frames = self.past_frames + list(range(step.start_frame, step.start_frame + step.num_frames))
        return rotate(torch.cat([self.past_k, k], 1), [pos[a] for a in frames]), torch.cat([self.past_v, v], 1)

    def commit(self) -> None:
        """Write the entries of a grad-enabled call (no-op for in-place calls)."""
        if self.pending is not None:
            self.cache._write(self.index, self.step, *self.pending)
            if self.cache.k_rotated is not None:
                self.cache._rotated_current[self.index] = False  # refreshed by the next in-place call
            self.pending = None
