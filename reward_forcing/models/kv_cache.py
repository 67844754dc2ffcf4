"""The streaming KV cache: a sliding window of past frames plus a sink, with a pluggable sink policy.

What is stored
--------------
One key and one value buffer for all layers, ``[layers, B, capacity_frames * tokens_per_frame, heads,
head_dim]``. Keys are stored **after** the q/k RMSNorm and **before** RoPE: RoPE is re-applied on every call
with *window-relative* frame positions (docs/reference.md, Causal KV cache), bounded even for very long
videos; ``CausalSpec.rope_positions="absolute"`` uses each frame's index instead, as Self Forcing and LongLive
rotate their cached keys (configs/community/).

Slots (frames)
--------------
``capacity = local_attn_size`` frames (or ``max_frames`` for global attention, ``local_attn_size = -1``).
The first ``S`` slots are the **sink** and hold frames ``0..S-1`` (the sink is initialised from the first
frames written, as in the reference). The remaining ``W = capacity - S`` slots are a **ring**: frame ``a >= S``
lives in slot ``S + (a - S) % W``. A new chunk therefore overwrites exactly the oldest non-sink frames - the
frames the reference evicts by rolling its buffer (docs/reference.md, Causal KV cache) - without
copying the window. Attention does not depend on key order, so keys are read in slot order and each slot gets
the RoPE position of its frame's *rank* among the frames held (sink first, then the window oldest to newest);
queries get the last positions. This equals the reference's "keys 0..n-1 in buffer order, queries n-N..n-1".
The bookkeeping (:class:`CacheWindow`) is shared with the block-causal mode: :func:`block_causal_plan`
replays it over a whole sequence, so both modes attend by the same rules.

Sink policies (``CausalSpec.sink_policy``, the ``SINK_POLICIES`` registry of :class:`SinkPolicy` classes)
-------------------------------------------------------------------------------------------------------
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
cache also keeps each layer's keys *after* RoPE: on the first call of a chunk :meth:`KVCache.rotate_past`
re-rotates the past keys of every layer once, before the layers run, and each layer rotates only the
chunk's own keys (on every call: denoising steps and the context pass). Rotation acts token by token, so
every element goes through the same arithmetic as rotating the whole window per call (outputs are
bit-identical, tested), at the cost of one more key buffer. ``rotated_keys=False`` rotates the whole window
inside every layer on every call.

One plan per call, tensors per layer (torch.compile, CUDA graphs)
-----------------------------------------------------------------
Everything that changes from call to call - which chunk, evictions, the EMA fold, RoPE positions, which
rotations are stale - is decided once per call by :meth:`KVCache.begin` in plain Python, before any layer
runs. A layer then sees only tensors: its own views of the buffers (made once, fixed addresses), token
indices memoised per slot layout, and the number of valid tokens. So one compiled block serves all layers;
the only shape that varies is the window length while the ring fills (3, 6 then 9 frames for the shipped
geometry), and the repeated calls of a chunk (4 denoising steps and the context pass) pass identical
tensors at identical addresses without a host sync.

Gradients
---------
With grad enabled (training rollouts, gradient checkpointing), a layer reads a *snapshot* of its past keys
taken before the block runs and the new keys are written after it (``commit``), so a checkpoint recompute
sees the same cache whatever order autograd recomputes blocks in (docs/reference.md, Causal KV cache, on the reference's
fragility here).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch


class SinkPolicy(Protocol):
    """What a sink does: whether the first ``sink_size`` frames are kept, and how a frame evicted from the window
    is folded into them. A new policy is a class with these three members and a line in ``SINK_POLICIES``."""

    keeps_sink: bool  # False: a plain sliding window (sink_size is ignored)
    folds: bool  # whether evicted frames are folded into the sink (then fold() is called per frame and buffer)

    def fold(self, sink: torch.Tensor, evicted: torch.Tensor, alpha: float) -> None:
        """Fold one evicted frame's keys or values ``evicted`` into its sink frame ``sink``, in place."""


class NoSink:
    keeps_sink, folds = False, False

    def fold(self, sink, evicted, alpha) -> None:
        pass


class StaticSink:
    """The first frames verbatim; evicted frames are dropped (what the reference trains with)."""

    keeps_sink, folds = True, False

    def fold(self, sink, evicted, alpha) -> None:
        pass


class EmaSink:
    """``sink <- alpha * sink + (1 - alpha) * evicted`` (the EMA-Sink)."""

    keeps_sink, folds = True, True

    def fold(self, sink: torch.Tensor, evicted: torch.Tensor, alpha: float) -> None:
        sink.copy_(alpha * sink + (1 - alpha) * evicted)


SINK_POLICIES: dict[str, SinkPolicy] = {"none": NoSink(), "static": StaticSink(), "ema": EmaSink()}


@dataclass(frozen=True)
class CausalSpec:
    """How the causal student attends: chunk size, window, sink and sink policy (all in latent frames).

    The one place these values are validated; every error message starts with the field's name, so a config
    loader can prefix its section (``causal.sink_policy ...``).
    """

    frames_per_block: int = 3  # latent frames per chunk (12 video frames)
    local_attn_size: int = 9  # attention window in latent frames, sink included; -1 = global
    sink_size: int = 3  # sink frames, initialised from the first frames
    sink_policy: str = "ema"  # none | static | ema
    ema_alpha: float = 0.999  # EMA-Sink decay (the reference's hard-coded value)
    # RoPE frame positions: "window" = each frame's rank among the frames held, sink first (Reward Forcing: bounded
    # for any length); "absolute" = the frame's index in the video, the sink at its own first frames (Self Forcing,
    # Causal Forcing, LongLive cache keys rotated at these). They agree until the first eviction.
    rope_positions: str = "window"

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.sink_policy not in SINK_POLICIES:
            raise ValueError(f"sink_policy {self.sink_policy!r} is not one of {tuple(SINK_POLICIES)}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.rope_positions not in ("window", "absolute"):
            raise ValueError(f"rope_positions {self.rope_positions!r} is not 'window' or 'absolute'")
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
        return self.sink_size if self.policy.keeps_sink else 0

    @property
    def policy(self) -> SinkPolicy:
        return SINK_POLICIES[self.sink_policy]

    def with_policy(self, sink_policy: str) -> "CausalSpec":
        return replace(self, sink_policy=sink_policy)


def rank_positions(frames: Sequence[int]) -> dict[int, int]:
    """Window-relative RoPE position of each frame: its rank among the frames attended (sink first)."""
    return {frame: rank for rank, frame in enumerate(sorted(frames))}


def frame_positions(frames: Sequence[int], rule: str) -> dict[int, int]:
    """RoPE position of each frame held under ``CausalSpec.rope_positions``: its rank, or its own index."""
    return rank_positions(frames) if rule == "window" else {frame: frame for frame in frames}


@dataclass
class CacheStep:
    """The plan of one model call against the cache, shared by all layers and computed before they run.

    The bookkeeping is plain Python (no host syncs); :meth:`KVCache.begin` adds the token-index tensors of the
    chunk and of the past slots, memoised per slot layout, so the repeated calls of a chunk hand the layers
    the very same tensors. A layer reads only those tensors and ``valid_tokens`` from here.
    """

    start_frame: int
    num_frames: int
    new_chunk: bool
    chunk_slots: list[int]
    slot_frame: list[int]  # frame held by each valid slot after this call's write (a prefix of the buffer)
    evicted_frames: list[int] = field(default_factory=list)
    frame_tokens: int = 1
    snapshot: bool = False  # grad-enabled call: layers attend to a snapshot of the past and write on commit
    refresh_rotated: bool = False  # past keys need re-rotating (KVCache.rotate_past) before the layers run
    chunk_index: torch.Tensor | None = None  # token indices of the chunk's slots
    past_index: torch.Tensor | None = None  # token indices of the other valid slots
    rope_positions: str = "window"  # CausalSpec.rope_positions

    def __post_init__(self):
        # Plain attributes, computed once per call (a cached_property's lock, Python < 3.12, breaks graphs).
        self.positions: dict[int, int] = frame_positions(self.slot_frame, self.rope_positions)
        self.query_positions: list[int] = [self.positions[a] for a in
                                           range(self.start_frame, self.start_frame + self.num_frames)]
        chunk = set(self.chunk_slots)
        self.past_slots: list[int] = [s for s in range(len(self.slot_frame)) if s not in chunk]
        self.past_positions: list[int] = [self.positions[self.slot_frame[s]] for s in self.past_slots]
        self.valid_tokens: int = len(self.slot_frame) * self.frame_tokens

    @property
    def key_positions(self) -> list[int]:
        """RoPE positions of the keys :meth:`LayerKV.attend` returns, in order: the valid slots in slot order,
        or (snapshot) the past slots then the chunk."""
        if self.snapshot:
            return self.past_positions + self.query_positions
        return [self.positions[a] for a in self.slot_frame]


class CacheWindow:
    """Which frame each slot holds: the sink and ring bookkeeping of the module docstring, without tensors.

    :class:`KVCache` keeps its buffers by it; :func:`block_causal_plan` replays it to give a whole sequence the
    attention pattern of streaming.
    """

    def __init__(self, spec: CausalSpec, *, max_frames: int | None = None, frame_tokens: int = 1):
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
        self.reset()

    def reset(self) -> None:
        """Forget every frame (start a new video)."""
        self.slot_frame: list[int] = []  # frame held by slot i, for the valid prefix of slots
        self.end_frame = 0  # one past the last frame written
        self.chunk_start = 0

    def _slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        if not self.wraps and frame >= self.capacity:
            raise RuntimeError(
                f"global-attention KV cache holds {self.capacity} frames but frame {frame} was written; "
                f"allocate it with max_frames >= the video length")
        return self.sink + (frame - self.sink) % self.ring

    def begin(self, start_frame: int, num_frames: int) -> CacheStep:
        """Plan a call on frames ``[start_frame, start_frame + num_frames)``; a new chunk evicts.

        A call either continues the stream (``start_frame == end_frame``: a new chunk) or repeats the current
        chunk (same start and length: another denoising step or the context pass).
        """
        end = start_frame + num_frames
        if self.end_frame > 0 and start_frame == self.chunk_start and end == self.end_frame:
            slots = [self._slot(a) for a in range(start_frame, end)]
            return CacheStep(start_frame, num_frames, False, slots, list(self.slot_frame),
                             frame_tokens=self.frame_tokens, rope_positions=self.spec.rope_positions)
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
        evicted = []  # oldest first
        for slot, frame in zip(slots, range(start_frame, end)):
            if slot < len(self.slot_frame):
                evicted.append(self.slot_frame[slot])
                self.slot_frame[slot] = frame
            else:  # slots fill in order until the buffer is full
                assert slot == len(self.slot_frame), (slot, self.slot_frame)
                self.slot_frame.append(frame)
        self.chunk_start, self.end_frame = start_frame, end
        return CacheStep(start_frame, num_frames, True, slots, list(self.slot_frame), evicted,
                         frame_tokens=self.frame_tokens, rope_positions=self.spec.rope_positions)

    def window_frames(self) -> list[int]:
        """Frames currently attended, in position order (sink first)."""
        return sorted(self.slot_frame)


# ------------------------------------------------------------------------------------ block-causal plan
@dataclass
class SinkCopy:
    """The sink as one query chunk of a block-causal pass sees it."""

    queries: tuple[int, int]  # the chunk's frames [start, end)
    frames: list[int]  # the sink frames it attends
    positions: list[int]  # their RoPE positions, in the pass's absolute frame positions


@dataclass
class BlockCausalPlan:
    """Frame-level attention of one block-causal pass that equals streaming the sequence chunk by chunk.

    Keys are the sequence's frames followed by one copy of the sink per chunk that has one (a chunk sees the
    sink at the positions its own window would give it, which differ from chunk to chunk).
    ``frame_mask[q, k]`` (bool ``[F, F + sum(len(copy.frames))]``) says whether query frame ``q`` attends key
    frame ``k``.
    """

    frame_mask: torch.Tensor
    sink_copies: list[SinkCopy]


def block_causal_plan(spec: CausalSpec, num_frames: int) -> BlockCausalPlan:
    """Replay a streaming cache over ``num_frames`` frames and record who attends whom.

    Queries and window keys keep their absolute frame positions (inside the window, query-key offsets equal
    the streaming, window-relative ones); each chunk's sink copy is shifted so that its offsets to the
    chunk's queries do too. The sink is the first frames verbatim (the reference's training-time cache,
    which never evicts); EMA folding only happens on evictions in a streaming cache.
    """
    window = CacheWindow(spec, max_frames=num_frames)
    sequence = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    copies, copy_masks = [], []
    for start in range(0, num_frames, spec.frames_per_block):
        end = min(start + spec.frames_per_block, num_frames)
        step = window.begin(start, end - start)
        held = sorted(step.slot_frame)
        sequence[start:end, [a for a in held if a >= window.sink]] = True
        sink = [a for a in held if a < window.sink]
        if sink:
            shift = start - step.positions[start]  # absolute minus window-relative position of the first query
            copies.append(SinkCopy((start, end), sink, [step.positions[a] + shift for a in sink]))
            mask = torch.zeros(num_frames, len(sink), dtype=torch.bool)
            mask[start:end] = True
            copy_masks.append(mask)
    return BlockCausalPlan(torch.cat([sequence, *copy_masks], dim=1), copies)


# ---------------------------------------------------------------------------------------- the cache
class KVCache(CacheWindow):
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
        super().__init__(spec, max_frames=max_frames, frame_tokens=frame_tokens)
        shape = (num_layers, batch_size, self.capacity * self.frame_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_rotated = torch.zeros(shape, device=device, dtype=dtype) if rotated_keys else None
        # One view per layer and buffer, made once: a layer's slice reaches a compiled block as a tensor of
        # fixed address (static for CUDA graphs), never as an index it would be specialised on.
        self.layer_views = [(self.k[i], self.v[i], None if self.k_rotated is None else self.k_rotated[i])
                            for i in range(num_layers)]
        self._token_indices: dict[tuple[int, ...], torch.Tensor] = {}
        self._static_marked = False
        self._rotated_valid = False  # k_rotated holds this chunk's rotations of the past keys

    @classmethod
    def for_model(cls, model, *, batch_size: int, frame_tokens: int, spec: CausalSpec | None = None,
                  max_frames: int | None = None, device=None, dtype=None, rotated_keys: bool = True) -> "KVCache":
        """A cache shaped for ``model`` (a ``WanModel``): one entry per layer it holds (``model.held_layers``: all of
        them, or a pipeline stage's slice); spec defaults to ``model.causal``."""
        ref = model.patch_embedding.weight
        return cls(num_layers=len(model.held_layers), num_heads=model.config.num_heads,
                   head_dim=model.config.head_dim, frame_tokens=frame_tokens, batch_size=batch_size,
                   spec=spec or model.causal, max_frames=max_frames,
                   device=device if device is not None else ref.device,
                   dtype=dtype if dtype is not None else ref.dtype, rotated_keys=rotated_keys)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (keys, values and, if kept, rotated keys)."""
        buffers = [b for b in (self.k, self.v, self.k_rotated) if b is not None]
        return sum(b.numel() * b.element_size() for b in buffers)

    def reset(self) -> None:
        """Forget every frame (start a new video). Buffers are not cleared: nothing reads an unwritten slot."""
        super().reset()
        self.num_sink_updates = 0  # EMA folds per layer: one per chunk that evicted frames (4 for 21 frames)
        self._rotated_valid = False

    # ----------------------------------------------------------------------------------- bookkeeping
    def begin(self, start_frame: int, num_frames: int) -> CacheStep:
        """Plan a call (see :meth:`CacheWindow.begin`); a new chunk folds its evicted frames into the sink.

        With grad enabled the call's layers read a snapshot of the past and write on ``commit``; otherwise
        they write in place. When the cache keeps rotated keys and the past keys' positions moved (new chunk)
        or were written unrotated (after a grad-enabled call), ``step.refresh_rotated`` asks the caller to run
        :meth:`rotate_past` before the layers.
        """
        step = super().begin(start_frame, num_frames)
        if step.evicted_frames and self.spec.policy.folds and self.sink > 0:
            self._fold_into_sink(step.evicted_frames)
        step.snapshot = torch.is_grad_enabled()
        step.chunk_index = self._token_index(step.chunk_slots)
        step.past_index = self._token_index(step.past_slots)
        if step.snapshot:
            self._rotated_valid = False  # the commits write keys, not their rotations
        elif self.k_rotated is not None:
            step.refresh_rotated = step.new_chunk or not self._rotated_valid
        return step

    def _token_index(self, slots: Sequence[int]) -> torch.Tensor:
        """Token indices of ``slots``, memoised: a given slot layout always yields the same tensor."""
        key = tuple(slots)
        index = self._token_indices.get(key)
        if index is None:
            base = torch.arange(self.frame_tokens)
            index = (torch.tensor(key, dtype=torch.long)[:, None] * self.frame_tokens + base).reshape(-1)
            index = self._token_indices[key] = index.to(self.k.device)
        return index

    def _tokens(self, slot: int) -> slice:
        return slice(slot * self.frame_tokens, (slot + 1) * self.frame_tokens)

    @torch.no_grad()
    def _fold_into_sink(self, evicted: list[int]) -> None:
        """EMA-fold evicted frames - still in their slots: the new chunk is not written yet - into the sink,
        oldest first."""
        alpha, policy = self.spec.ema_alpha, self.spec.policy
        for frame in evicted:
            slot, sink_slot = self._slot(frame), (frame - self.sink) % self.sink
            for buf in (self.k, self.v):
                policy.fold(buf[:, :, self._tokens(sink_slot)], buf[:, :, self._tokens(slot)], alpha)
        self.num_sink_updates += 1

    @torch.no_grad()
    def rotate_past(self, step: CacheStep, rotate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Refresh every layer's rotated past keys; ``rotate`` applies RoPE at ``step.past_positions``.

        Runs once per chunk, before the layers, so the layers themselves only ever rotate the chunk's keys.
        Rotation acts token by token, so this equals rotating the whole window inside each layer.
        """
        if not step.refresh_rotated:
            return
        if step.past_slots:
            for k, _, k_rotated in self.layer_views:
                k_rotated.index_copy_(1, step.past_index, rotate(k.index_select(1, step.past_index)))
        self._rotated_valid = True

    # --------------------------------------------------------------------------------- per layer
    def layer(self, index: int, step: CacheStep) -> "LayerKV":
        """Layer ``index``'s access to the cache for this call. Take it *outside* a checkpointed block."""
        k, v, k_rotated = self.layer_views[index]
        if step.snapshot:
            return LayerKV(step, k, v, None, k.index_select(1, step.past_index), v.index_select(1, step.past_index))
        return LayerKV(step, k, v, k_rotated)

    def mark_static_addresses(self) -> None:
        """Tell torch.compile that the buffers never move. CUDA graphs (compile modes ``reduce-overhead`` and
        ``max-autotune``) then update them in place; a graph that writes an input of unknown address is run
        without CUDA graphs. The address is not guarded, so the one graph still serves every layer."""
        if self._static_marked:
            return
        from torch._dynamo import mark_static_address

        for view in self.layer_views:
            for buffer in view:
                if buffer is not None:
                    mark_static_address(buffer)
        self._static_marked = True

    def sink_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink keys/values of one layer, ``[B, S * tokens, heads, head_dim]`` (pre-RoPE keys)."""
        tokens = slice(0, self.sink * self.frame_tokens)
        return self.k[index][:, tokens], self.v[index][:, tokens]

    def reopen(self, start_frame: int) -> None:
        """Make the held frames ``[start_frame, end_frame)`` the current chunk, so the next call on exactly those
        frames rewrites their keys/values in place - no eviction, no sink fold, positions unchanged (a live
        session re-encodes its window under a new prompt this way)."""
        frames = range(start_frame, self.end_frame)
        if not frames or any(a not in self.slot_frame for a in frames):
            raise ValueError(f"cannot reopen frames [{start_frame}, {self.end_frame}): the cache holds "
                             f"{self.window_frames()}")
        self.chunk_start = start_frame


class LayerKV:
    """One layer's access to the cache during one call: tensors (its views of the buffers) and the shared step.

    ``attend(k, v, rotate_chunk, rotate_keys)`` returns the keys (RoPE applied) and values to attend to, in
    the order of ``step.key_positions``. ``rotate_chunk`` applies RoPE at the chunk's positions
    (``step.query_positions``), ``rotate_keys`` at ``step.key_positions``. Without grad the new entries are
    written in place and the valid buffer prefix is used; with grad the keys are ``[snapshot of past, new]``
    and the write waits for ``commit``. Nothing here is a per-layer Python value, so one compiled block serves
    every layer.
    """

    def __init__(self, step: CacheStep, k: torch.Tensor, v: torch.Tensor, k_rotated: torch.Tensor | None,
                 past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None):
        self.step, self.k, self.v, self.k_rotated = step, k, v, k_rotated
        self.past_k, self.past_v = past_k, past_v
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(1, self.step.chunk_index, k.to(self.k.dtype))
        self.v.index_copy_(1, self.step.chunk_index, v.to(self.v.dtype))

    def attend(self, k: torch.Tensor, v: torch.Tensor, rotate_chunk: Callable[[torch.Tensor], torch.Tensor],
               rotate_keys: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was allocated for batch {self.k.shape[0]}, got a batch of {k.shape[0]}")
        if self.past_k is None:
            self._write(k, v)
            n = self.step.valid_tokens
            if self.k_rotated is None:
                return rotate_keys(self.k[:, :n]), self.v[:, :n]
            # The past keys were rotated for this chunk's positions before the layers ran (rotate_past).
            self.k_rotated.index_copy_(1, self.step.chunk_index, rotate_chunk(k.to(self.k.dtype)))
            return self.k_rotated[:, :n], self.v[:, :n]
        self.pending = (k.detach(), v.detach())
        return rotate_keys(torch.cat([self.past_k, k], 1)), torch.cat([self.past_v, v], 1)

    def rows(self, rows: slice) -> "LayerKV":
        """The same access restricted to batch rows ``rows`` (views: writes land in the cache); a pipeline stage
        runs its micro-batches through one layer this way. ``slice(None)`` returns this object."""
        if rows == slice(None):
            return self

        def view(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return LayerKV(self.step, self.k[rows], self.v[rows], view(self.k_rotated), view(self.past_k),
                       view(self.past_v))

    def commit(self) -> None:
        """Write the entries of a grad-enabled call (no-op for in-place calls)."""
        if self.pending is not None:
            self._write(*self.pending)
            self.pending = None
