"""Resumable training checkpoints: atomic DCP folders, finding the newest, leftovers, keeping the last K.

A checkpoint folder ``<logdir>/checkpoints/step_NNNNNN`` holds everything a resume needs (models, optimizers,
EMA, every rank's RNG, the step and the data position) and is written with ``torch.distributed.checkpoint``
(DCP), so every rank writes its own shards and a later run may load it at another world size. Full
(unsharded) state dicts for the reference-format export are gathered by :func:`full_state_dict`.

The reference only wrote a rank-0 full state dict, and with its shipped config never (docs/differences.md,
training row "checkpoints").
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from ..file_io import atomic_save, commit, leftover_temps, load_torch_file, normalize_key, temp_sibling
from .parallel import all_ranks_ok, barrier, broadcast_object, get_rank, is_distributed

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_META_FILE = "extra.pt"
_RNG_DIR = "rng"
_STEP_NAME = re.compile(r"step_(\d+)")


# ================================================================================== full state dicts
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict with clean keys on rank 0; an empty dict on the other ranks.

    Collective when the module is sharded: call it on **every** rank. The tensors never alias the live
    parameters, so the result can be saved later.
    """
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    live = {(t.to_local() if isinstance(t, DTensor) else t).data_ptr()
            for t in module.state_dict().values() if isinstance(t, torch.Tensor)}
    out = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.data_ptr() in live:  # plain CPU modules come back by reference
                value = value.clone()
        out[normalize_key(key)] = value
    return out


# ================================================================================== finding checkpoints
def _is_complete(folder: Path) -> bool:
    return (folder / ".metadata").is_file() and (folder / _META_FILE).is_file()


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints ``step_N`` in ``folder``, oldest first (by step number). Leftovers of an
    interrupted save (hidden ``.step_N.tmp-*`` folders) are never listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_NAME.fullmatch(p.name)) and p.is_dir() and _is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders an interrupted (killed) save left in ``folder``; returns them. Rank 0 only,
    while no save runs."""
    removed = []
    for path, target in leftover_temps(folder).items():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s, left by an interrupted save of %s", path, target)
    return removed


def prune_checkpoints(folder: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints in ``folder`` (None keeps all); returns the
    paths deleted. Rank 0 only."""
    if keep_last is None:
        return []
    old = list_checkpoints(folder)[:-keep_last]
    for path in old:
        shutil.rmtree(path)
    return old


# ================================================================================== save / load
@contextlib.contextmanager
def _quiet_single_process_dcp():
    """DCP warns "assuming the intent is to save/load in a single process" even with ``no_dist=True``;
    that is exactly the intent here, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def _rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            # Lists instead of an ndarray so the file loads with weights_only=True.
            "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this process sees "
                          f"{torch.cuda.device_count()}; CUDA RNG not restored")


def _check_pairs(models: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    stray = sorted(set(optimizers) - set(models))
    if stray:
        raise ValueError(f"optimizers {stray} have no model of the same name; optimizers are paired with "
                         f"models by key (models: {sorted(models)})")


def _model_and_optim_state(models, optimizers) -> dict[str, Any]:
    state: dict[str, Any] = {"models": {}, "optimizers": {}}
    for name, model in models.items():
        opt = optimizers.get(name)
        if opt is None:
            state["models"][name] = get_model_state_dict(model)
        else:
            state["models"][name], state["optimizers"][name] = get_state_dict(model, optimizers=opt)
    return state


def save_training_state(
    directory: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    extra: Mapping[str, Any] | None = None,
    stateful: Mapping[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint folder with ``torch.distributed.checkpoint``; call on **every** rank.

    Layout of ``directory``:
      * DCP files (``.metadata``, ``__<rank>_0.distcp``): ``models.<name>`` and ``optimizers.<name>``
        (each optimizer is paired with the model of the same key, so sharded parameters and their Adam
        moments are stored shard by shard and can be reloaded at another world size), and ``stateful.<name>``
        for objects with per-rank ``state_dict``/``load_state_dict`` (the :class:`~.ema.ShardedEMA`);
      * ``extra.pt`` (rank 0): ``extra`` (step, sampler state ...: plain python values and tensors,
        identical on all ranks) plus format metadata;
      * ``rng/rank_<r>.pt``: each rank's python / numpy / torch / CUDA RNG states.

    Atomic: everything is written to a hidden sibling ``.<name>.tmp-XXXXXXXX``; only after every rank
    succeeded does rank 0 rename it to ``directory`` (replacing an existing one). A failure on any rank removes
    the temporary folder and raises on every rank, so ``directory`` never holds a half-written checkpoint; a
    killed job leaves the temporary folder, which :func:`remove_leftovers` cleans and :func:`list_checkpoints`
    never lists. The folder must be on a file system shared by all ranks.
    """
    optimizers = dict(optimizers or {})
    stateful = dict(stateful or {})
    extra = dict(extra or {})
    _check_pairs(models, optimizers)
    directory = Path(directory).expanduser().absolute()
    rank, main = get_rank(), get_rank() == 0

    error: BaseException | None = None
    tmp: Path | None = None
    ok = True
    if main:
        try:
            tmp = temp_sibling(directory, directory=True)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error, ok = e, False
    tmp = broadcast_object(tmp)
    ok = all_ranks_ok(ok)

    if ok:
        try:
            state = _model_and_optim_state(models, optimizers)
            state["stateful"] = {name: obj.state_dict() for name, obj in stateful.items()}
            with _quiet_single_process_dcp():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
            atomic_save(_rng_state(), tmp / _RNG_DIR / f"rank_{rank:05d}.pt")
            if main:
                world = torch.distributed.get_world_size() if is_distributed() else 1
                meta = {"format": CHECKPOINT_FORMAT, "world_size": world, "models": sorted(models),
                        "optimizers": sorted(optimizers), "stateful": sorted(stateful), "extra": extra}
                atomic_save(meta, tmp / _META_FILE)
        except Exception as e:  # noqa: BLE001
            error, ok = e, False
        ok = all_ranks_ok(ok)

    if ok and main:
        try:
            commit(tmp, directory)
        except Exception as e:  # noqa: BLE001
            error, ok = e, False
    ok = all_ranks_ok(ok)

    if not ok:
        if main and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if error is not None:
            raise error
        raise RuntimeError(f"saving checkpoint {directory} failed on another rank (see its log); "
                           "nothing was written")
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    if not _is_complete(directory):
        hint = " (a '.tmp-' folder is left by an interrupted save)" if ".tmp-" in directory.name else ""
        raise FileNotFoundError(f"{directory} is not a training checkpoint written by save_training_state: "
                                f"'.metadata' or '{_META_FILE}' is missing{hint}")
    meta = load_torch_file(directory / _META_FILE)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def checkpoint_extra(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` dict of a checkpoint folder, without loading any model (e.g. to decide what to load)."""
    return _read_meta(Path(directory).expanduser().absolute())["extra"]


def load_training_state(
    directory: str | os.PathLike,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    *,
    stateful: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a folder written by :func:`save_training_state` in place and return its ``extra`` dict.

    Call on every rank, after sharding the models exactly as for training and building the optimizers.
    Models / optimizers / stateful objects are matched by key; a subset of what was saved may be loaded.
    DCP reshards, so the world size may differ from the saving run (RNG states then only restore for the
    ranks that have a file).
    """
    optimizers = dict(optimizers or {})
    stateful = dict(stateful or {})
    _check_pairs(models, optimizers)
    directory = Path(directory).expanduser().absolute()
    meta = _read_meta(directory)
    for kind, wanted in (("models", models), ("optimizers", optimizers), ("stateful", stateful)):
        absent = sorted(set(wanted) - set(meta[kind]))
        if absent:
            raise KeyError(f"{directory} has no {kind} {absent}; it holds {kind} {meta[kind]}")

    state = _model_and_optim_state(models, optimizers)
    state["stateful"] = {name: obj.state_dict() for name, obj in stateful.items()}
    with _quiet_single_process_dcp():
        dcp.load(state, checkpoint_id=str(directory), no_dist=not is_distributed())
    for name, model in models.items():
        opt = optimizers.get(name)
        if opt is None:
            set_model_state_dict(model, state["models"][name])
        else:
            set_state_dict(model, optimizers=opt, model_state_dict=state["models"][name],
                           optim_state_dict=state["optimizers"][name])
    for name, obj in stateful.items():
        obj.load_state_dict(state["stateful"][name])

    if restore_rng:
        rng_file = directory / _RNG_DIR / f"rank_{get_rank():05d}.pt"
        if rng_file.is_file():
            _set_rng_state(load_torch_file(rng_file))
        else:
            warnings.warn(f"{rng_file} not found (checkpoint saved with world size {meta['world_size']}); "
                          "RNG state of this rank not restored")
    return meta["extra"]
