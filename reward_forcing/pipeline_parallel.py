"""Pipeline-parallel streaming: the student's transformer layers split across ranks, one stage per rank.

Under ``torchrun --nproc_per_node N inference.py ... model.pipeline_parallel=true`` every rank runs the same
program - the same block loop, prompts and seeded noise - with a :class:`WanPipelineStage` as its generator. A
stage holds the layers ``[a, b)`` of :func:`stage_layers` (the others are dropped before the weights reach the
device), the KV cache and sink of those layers only, and their cross-attention K/V. Each forward:

1. every rank plans the call (:meth:`WanModel.plan_forward`: patch and time embeddings, the cache's plan for
   this call, the sink fold of its own layers); these are a few small ops, cheaper than sending their results;
2. stage 0 runs its layers on the tokens and sends the hidden states to stage 1, which runs its layers, and so
   on; the last stage applies the head;
3. the last stage broadcasts the flow (the size of the latents, ~20x less than the hidden states), so every
   rank continues the block loop with the same numbers and the caches stay in step.

The batch can be split into ``micro_batches`` that follow each other through the stages: while stage 1 runs
micro-batch 0, stage 0 runs micro-batch 1. One stream (batch 1) cannot be split, so it leaves each rank idle
``(N - 1) / N`` of the time: pipelining one stream saves memory, not time. Batched streams with ``M`` micro-batches
keep each rank busy ``M / (M + N - 1)`` of a forward (docs/multi_gpu.md has the expected FPS).

Point-to-point ``torch.distributed`` sends rather than ``torch.distributed.pipelining``: its schedules drive one
training step of independent micro-batches from a traced or split module, while here each forward of the block
loop needs the previous forward's output and every stage keeps a KV cache the forward mutates in place.

:class:`PipelineStats` counts what the benchmark (``scripts/pipeline_benchmark.py``) reports: each rank's time
in its own layers, and the bytes it sent.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .models.kv_cache import KVCache
from .models.wan import TextContext, WanModel


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """The layers of ``stage`` when ``num_layers`` are split into ``stages`` contiguous, near-equal ranges (the
    first ``num_layers % stages`` stages take one more)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} pipeline stages for a model of {num_layers} layers: use 1 to {num_layers} ranks")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not one of the {stages} stages")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def micro_batch_rows(batch: int, micro_batches: int) -> list[slice]:
    """Contiguous row slices splitting ``batch`` into ``min(micro_batches, batch)`` near-equal micro-batches."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    count = min(micro_batches, batch)
    bounds = [i * batch // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def init_from_env(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)`` of a ``torchrun`` launch, with the process group started (NCCL on CUDA devices,
    gloo otherwise); ``(0, 1)`` and no group for a plain ``python`` run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class PipelineStats:
    """What one stage did since the last :meth:`reset`: forwards run, seconds in its own layers (and the head),
    bytes it sent (hidden states and, from the last stage, the broadcast flow)."""

    forwards: int = 0
    busy_s: float = 0.0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.forwards, self.busy_s, self.bytes_sent = 0, 0.0, 0


class WanPipelineStage(WanModel):
    """One rank's stage of a causal Wan student split across ``stages`` ranks (see the module docstring).

    Build with :meth:`from_model`. The stage is a ``WanModel`` holding ``stage_layers(...)``: the block loop, the
    session and the KV cache (``new_kv_cache`` allocates this stage's layers only) use it unchanged. Ranks of the
    default process group are the stages, in order. ``timing``: synchronise the device around each stage's
    compute so :attr:`stats` ``busy_s`` is exact (the benchmark sets it; costs a little overlap on a GPU).
    """

    def __init__(self, config, causal=None, *, stage: int = 0, stages: int = 1, micro_batches: int = 1):
        super().__init__(config, causal)
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.stage, self.stages, self.micro_batches = stage, stages, micro_batches
        layers = stage_layers(config.num_layers, stages, stage)
        self.hold_layers(layers.start, layers.stop)
        self.stats = PipelineStats()
        self.timing = False

    @classmethod
    def from_model(cls, model: WanModel, *, stage: int, stages: int, micro_batches: int = 1,
                   device=None) -> "WanPipelineStage":
        """This rank's stage of ``model`` (a full ``WanModel``, e.g. just loaded on the CPU): its layers' weights
        (and the shared embeddings and head) moved to ``device`` (default: where ``model`` is)."""
        with torch.device("meta"):
            staged = cls(model.config, model.causal, stage=stage, stages=stages, micro_batches=micro_batches)
        held = staged.state_dict().keys()
        staged.load_state_dict({k: v for k, v in model.state_dict().items() if k in held}, strict=True, assign=True)
        staged.rope.precision = model.rope.precision
        staged.train(model.training)
        return staged.to(device if device is not None else model.patch_embedding.weight.device)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | TextContext, *,
                kv_cache: KVCache | None = None, start_frame: int = 0, causal: bool = False) -> torch.Tensor:
        """``WanModel.forward`` across the stages; every rank returns the same flow."""
        if self.stages == 1:
            return super().forward(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, causal=causal)
        if torch.is_grad_enabled():
            raise RuntimeError("a pipeline stage streams without gradients (inference); train with FSDP instead")
        plan = self.plan_forward(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, causal=causal)
        tokens = plan.tokens
        flows, sends = [], []
        for rows in micro_batch_rows(tokens.shape[0], self.micro_batches):
            if self.is_first:
                hidden = tokens[rows]
            else:
                hidden = torch.empty(tokens[rows].shape, dtype=tokens.dtype, device=tokens.device)
                dist.recv(hidden, src=self.stage - 1)
            started = self._clock()
            hidden = self.run_layers(hidden, plan, rows)
            if self.is_last:
                flows.append(self.output(hidden, plan, rows))
            self.stats.busy_s += self._clock() - started
            if not self.is_last:
                hidden = hidden.contiguous()
                sends.append((dist.isend(hidden, dst=self.stage + 1), hidden))  # kept alive
                self.stats.bytes_sent += hidden.numel() * hidden.element_size()
        for request, _ in sends:
            request.wait()
        if self.is_last:
            flow = torch.cat(flows)
            self.stats.bytes_sent += flow.numel() * flow.element_size()
        else:  # the head's output: the latents' shape with out_dim channels, in the activations' dtype
            shape = (x.shape[0], plan.grid[0] * self.config.patch_size[0], self.config.out_dim,
                     plan.grid[1] * self.config.patch_size[1], plan.grid[2] * self.config.patch_size[2])
            flow = torch.empty(shape, device=tokens.device, dtype=tokens.dtype)
        dist.broadcast(flow, src=self.stages - 1)
        self.stats.forwards += 1
        return flow

    def _clock(self) -> float:
        if self.timing and self.patch_embedding.weight.device.type == "cuda":
            torch.cuda.synchronize(self.patch_embedding.weight.device)
        return time.perf_counter()
