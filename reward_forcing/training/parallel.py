"""Parallelism: the process group, collectives the trainer needs, seeding, and FSDP2 sharding.

Works in three situations:

* **one process, no process group** (``python train.py``, unit tests): every collective is a no-op and
  :func:`parallelize` leaves the models untouched;
* ``torchrun`` on GPUs: NCCL, FSDP2 over a 1-D mesh of all ranks;
* ``torchrun`` / ``torch.multiprocessing`` on CPU: gloo (slow, but the same code paths).

Sharding differs from the reference on purpose (docs/differences.md, training row "sharding"): FSDP2
``fully_shard`` per transformer block plus the root, instead of FSDP1 with a size-based wrap policy under which
the whole 1.3B DiT is a single unit (full all-gathers of the model); per-block units overlap communication and
bound peak memory.
"""
from __future__ import annotations

import gc
import os
import random
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from ..config import Config
    from .build import TrainingModels


# ================================================================================== process group
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``world_size == 1`` means no process group exists."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True when a process group is initialised (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    * No torchrun variables (or WORLD_SIZE=1): **no process group** is created; the device is
      ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
    * Several processes: ``nccl`` when CUDA is available (the CUDA device is set to LOCAL_RANK first),
      ``gloo`` otherwise; ``backend`` overrides the choice.
    * If a process group already exists (e.g. created by a test harness) it is reused.
    """
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")

    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                               "visible; launch with --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world > 1 and not is_distributed():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {missing} not set; launch with torchrun")
        chosen = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)


def barrier() -> None:
    """``dist.barrier()`` when a process group exists, else nothing."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call twice or without one).

    All ranks meet at a barrier first: destroying the group while a peer still has a collective in flight
    makes gloo abort. Call it once the sharded models, their optimizers and the EMA are released (return from
    the function that used them first): FSDP2 modules sit in reference cycles, and when they are only collected
    during interpreter shutdown, gloo processes now and then die with SIGABRT ("terminate called without an
    active exception") after a run that succeeded. The collection here frees them while torch is intact.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s ``obj`` on every rank (pickled); returns ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_int(value: int, src: int = 0) -> int:
    """Return ``src``'s integer on every rank (e.g. the rollout's exit step); identity for one process."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_ranks_ok(ok: bool) -> bool:
    """True iff ``ok`` is true on every rank (an all-reduce MIN; also acts as a barrier)."""
    if not is_distributed():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks, returned on ``values``' device (float64, so sums of
    many logged values lose nothing); a copy of ``values`` for one process."""
    out = values.detach().to(torch.float64, copy=True)
    if is_distributed():
        moved = out.to(_collective_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out = moved.to(values.device)
    return out


def seed_everything(seed: int | None, rank: int | None = None) -> int:
    """Seed python, numpy and torch (all CUDA devices) with ``seed + rank`` and return that value.

    Deterministic: ``seed`` is used as given, including 0 (the reference's ``seed: 0`` meant "random", which
    made runs irreproducible; ``seed=None`` draws a random seed on rank 0 and shares it). The rank offset
    gives each rank different noise and rollouts while keeping the run reproducible.
    """
    if rank is None:
        rank = get_rank()
    if seed is None:
        seed = broadcast_int(secrets.randbelow(10_000_000) if get_rank() == 0 else 0)
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (or None for a random one), got {seed}")
    actual = int(seed) + int(rank)
    random.seed(actual)
    import numpy as np

    np.random.seed(actual % 2**32)
    torch.manual_seed(actual)  # also seeds every CUDA device
    return actual


# ================================================================================== FSDP2 sharding
def shard_model(module: nn.Module, *, mixed_precision: bool) -> nn.Module:
    """FSDP2-shard ``module`` in place: ``fully_shard`` each entry of ``module.blocks``, then the root.

    Parameters become ``DTensor`` shards over a 1-D mesh of all ranks; state-dict keys stay unchanged (no
    wrapper prefixes). ``mixed_precision`` gives bf16 all-gathered compute weights with fp32 master shards and
    fp32 gradient reduction, the reference's ``MixedPrecision(param=bf16, reduce=fp32)``. Forward inputs are
    not cast (``cast_forward_inputs=False``, like the reference): FSDP2's default would cast the timestep
    tensor to bf16, where 937.5 is not representable.

    One process (no process group): the module is returned unchanged, without any cast; the trainer then uses
    ``torch.autocast`` for bf16 compute.
    """
    if not is_distributed():
        return module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None,
                                  reduce_dtype=torch.float32 if mixed_precision else None,
                                  cast_forward_inputs=False)
    for block in getattr(module, "blocks", ()):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def parallelize(models: TrainingModels, cfg: Config, dist_info: DistInfo) -> TrainingModels:
    """Shard the DiTs of a training job over all ranks (FSDP2); a no-op for one process.

    The trainable generator and critic and the frozen teacher (``requires_grad`` off first, so no gradient
    buffers are planned; sharding keeps the 14B teacher at 1/world_size per rank) are sharded per transformer
    block. Text encoder, VAE and reward model stay whole on every rank, as in the reference. Mixed precision
    (bf16 compute, fp32 master weights and reduction) follows ``training.mixed_precision`` on GPUs. Call it
    before building optimizers and loading a checkpoint. Returns ``models`` (changed in place).
    """
    if not dist_info.distributed:
        return models
    mixed = cfg.training.mixed_precision and dist_info.device.type == "cuda"
    if models.teacher is not None and cfg.training.mode != "teacher":  # frozen unless it is what trains
        models.teacher.requires_grad_(False).eval()
    for name in ("generator", "critic", "teacher"):
        if getattr(models, name) is not None:  # which models exist depends on training.mode
            setattr(models, name, shard_model(getattr(models, name), mixed_precision=mixed))
    return models
