"""Timing of a stream: a clock of host time and device marks, and ``StreamingPipeline.stream`` timed through its
phase hook (``prepare_context``, then per block ``steps``, ``context``, ``decode``, ``block_end``), so the
figures come from the loop users run. Text encoding is timed on its own."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..pipeline import StreamingPipeline


def median(values):
    """Median of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Clock:
    """Host time + device marks. On CUDA, ``mark`` records an event (no sync) and ``sync`` is the only
    synchronisation; on CPU both are plain ``perf_counter`` reads."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Elapsed seconds between two marks (CUDA: only after a sync that follows ``b``)."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


@dataclass
class BlockTiming:
    index: int
    frames: int  # decoded video frames
    calls: int  # generator forward calls (steps + context pass)
    denoise_s: float
    context_s: float
    vae_s: float
    wall_s: float  # host time from the block's start to the sync after its decode

    @property
    def dit_s(self) -> float:
        return self.denoise_s + self.context_s


@dataclass
class RunTiming:
    ttff_s: float  # generation start (prompt already encoded) -> first decoded frames, synchronised
    prepare_context_s: float  # text MLP + every layer's cross-attention K/V (inside ttff_s)
    total_s: float  # generation start -> last block decoded
    blocks: list[BlockTiming] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def timed_stream(pipe: StreamingPipeline, context: torch.Tensor, clock: Clock, *, num_frames: int, height: int,
                 width: int, seed: int = 0, keep_outputs: bool = False) -> RunTiming:
    """Time ``pipe.stream(context=context, decode=True, ...)`` itself: the pipeline's phase hook records a mark as
    each phase starts and a forward pre-hook counts generator calls; the host waits for the device only after
    each yielded block."""
    marks: list[tuple[str, object, float]] = []  # (phase, device mark, host time)
    calls = [0]
    pipe.phase_hook = lambda name: marks.append((name, clock.mark(), time.perf_counter()))
    counter = pipe.generator.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    run = RunTiming(ttff_s=0.0, prepare_context_s=0.0, total_s=0.0)
    ends, block_calls = [], []
    try:
        t0 = clock.sync()
        for chunk in pipe.stream(context=context, num_frames=num_frames, height=height, width=width, seed=seed):
            host_end = clock.sync()  # the only sync of the block
            if chunk.index == 0:
                run.ttff_s = host_end - t0
            ends.append((chunk.frames.shape[1], host_end))
            block_calls.append(calls[0])
            calls[0] = 0
            if keep_outputs:
                run.latents.append(chunk.latents)
                run.frames.append(chunk.frames)
        run.total_s = time.perf_counter() - t0
    finally:
        pipe.phase_hook = None
        counter.remove()
    # Marks: prepare_context, then per block steps, context, decode, block_end.
    run.prepare_context_s = clock.seconds(marks[0][1], marks[1][1])
    per_block = [marks[i:i + 4] for i in range(1, len(marks), 4)]
    for index, (phases, (frames, host_end), n_calls) in enumerate(zip(per_block, ends, block_calls)):
        names = [name for name, _, _ in phases]
        assert names == ["steps", "context", "decode", "block_end"], names
        (_, steps, host_start), (_, ctx, _), (_, dec, _), (_, end, _) = phases
        run.blocks.append(BlockTiming(index, frames, n_calls, clock.seconds(steps, ctx), clock.seconds(ctx, dec),
                                      clock.seconds(dec, end), host_end - host_start))
    return run


def time_text_encoding(pipe: StreamingPipeline, prompt: str, clock: Clock, repeats: int, warmup: int):
    """Median seconds of ``pipe.encode_prompts([prompt])`` (synchronised before and after) and the context."""
    times = []
    context = None
    for i in range(warmup + repeats):
        t0 = clock.sync()
        context = pipe.encode_prompts([prompt])
        t1 = clock.sync()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times), context
