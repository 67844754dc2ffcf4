"""A training run's bookkeeping: its folder, its step budget and what it logs.

``logdir`` holds ``log.jsonl`` (one line per step), ``checkpoints/step_N`` (resumable), ``checkpoint_model_N/
model.pt`` (exports), ``samples/`` and ``config.yaml``. The step arithmetic (micro-batch per rank, which steps
update the generator, the learning-rate cooldown, the compute budget) is a function of the config and the step
alone, so a resumed run gets the same values. :class:`StepLog` averages a step's numbers over micro-batches and
ranks; :class:`RunLog` writes them (jsonl, the console, wandb).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainingConfig
from . import parallel

log = logging.getLogger(__name__)

LOG_FILE, CHECKPOINT_DIR, SAMPLE_DIR, EXPORT_PREFIX = "log.jsonl", "checkpoints", "samples", "checkpoint_model_"
CONFIG_FILE = "config.yaml"  # written by train.py


def previous_run(logdir: str | Path) -> list[Path]:
    """What an earlier run left in ``logdir`` (logs, checkpoints, exports, samples, its config), if anything."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [logdir / name for name in (LOG_FILE, CONFIG_FILE, SAMPLE_DIR) if (logdir / name).exists()]
    if any((logdir / CHECKPOINT_DIR).glob("*")):
        found.append(logdir / CHECKPOINT_DIR)
    return found + sorted(logdir.glob(EXPORT_PREFIX + "*"))


def remove_previous_run(logdir: str | Path) -> None:
    """Delete what :func:`previous_run` lists (``train.py --overwrite``), so two runs never mix in one folder."""
    for path in previous_run(logdir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def per_rank_batch_size(tr: TrainingConfig, world_size: int) -> int:
    """Micro-batch per rank: ``batch_size``, or ``global_batch_size / (world_size * accumulation)``."""
    if tr.global_batch_size <= 0:
        return tr.batch_size
    parts = world_size * tr.gradient_accumulation_steps
    if tr.global_batch_size % parts:
        raise ValueError(f"training.global_batch_size={tr.global_batch_size} is not divisible by world_size "
                         f"{world_size} x gradient_accumulation_steps {tr.gradient_accumulation_steps} = {parts}; "
                         f"use a multiple of {parts}")
    return tr.global_batch_size // parts


def is_generator_step(step: int, tr: TrainingConfig) -> bool:
    """Whether (0-based) step ``step`` also updates the generator: steps 0, ratio, 2 ratio, ... in dmd mode;
    every step in ode mode; never in teacher mode."""
    if tr.mode != "dmd":
        return tr.mode == "ode"
    return step % tr.dfake_gen_update_ratio == 0


def lr_factor(step: int, tr: TrainingConfig) -> float:
    """Learning-rate multiplier of (0-based) step ``step``: 1, then a linear decay over the last
    ``lr_cooldown_steps`` steps (the last step still learns a little); constant when that is 0."""
    if tr.lr_cooldown_steps <= 0:
        return 1.0
    return min(1.0, (tr.max_steps - step) / tr.lr_cooldown_steps)


@dataclass(frozen=True)
class TrainingBudget:
    """The compute a run performs per rank: a gradient evaluation is one micro-batch's forward and backward."""

    critic_steps: int
    critic_grad_evals: int
    generator_steps: int
    generator_grad_evals: int
    micro_batch: int  # prompts per rank and micro-batch
    critic_name: str = "critic"  # what the critic counts update: the teacher in teacher mode

    def __str__(self) -> str:
        return (f"{self.critic_name} {self.critic_grad_evals} gradient evaluations in {self.critic_steps} optimizer "
                "steps, "
                f"generator {self.generator_grad_evals} gradient evaluations in {self.generator_steps} optimizer "
                f"steps (per rank, {self.micro_batch} prompt(s) per micro-batch)")


def training_budget(tr: TrainingConfig, world_size: int = 1, start_step: int = 0) -> TrainingBudget:
    """Optimizer steps and gradient evaluations of steps ``start_step .. max_steps - 1`` (the whole run by
    default), counted the way :meth:`Trainer.train` loops."""
    steps = range(start_step, tr.max_steps)
    gen_steps = sum(1 for step in steps if is_generator_step(step, tr))
    accum = tr.gradient_accumulation_steps
    other = len(steps) if tr.mode != "ode" else 0  # critic updates (dmd) or teacher updates (teacher mode)
    return TrainingBudget(critic_steps=other, critic_grad_evals=other * accum,
                          generator_steps=gen_steps, generator_grad_evals=gen_steps * accum,
                          micro_batch=per_rank_batch_size(tr, world_size),
                          critic_name="teacher" if tr.mode == "teacher" else "critic")


class StepLog:
    """The numbers one step logs. Values added with :meth:`add` (losses, rewards, weights: one per micro-batch or
    per sample) are logged as their mean over every micro-batch and every rank (:meth:`reduce`, collective);
    :meth:`set` values (gradient norms, already global; timings) are logged as given."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.values: dict[str, float | int] = {}

    def add(self, prefix: str, info: dict) -> None:
        for key, value in info.items():
            value = torch.as_tensor(value).detach().double()
            name = prefix + key
            self._sums[name] = self._sums.get(name, 0.0) + value.sum().item()
            self._counts[name] = self._counts.get(name, 0) + value.numel()

    def set(self, name: str, value: float | int) -> None:
        self.values[name] = value

    def reduce(self) -> dict[str, float | int]:
        """Means over micro-batches and ranks of the added values, plus the set ones. Call on every rank."""
        names = sorted(self._sums)  # the same keys in the same order on every rank
        if names:
            local = torch.tensor([[self._sums[n], self._counts[n]] for n in names], dtype=torch.float64)
            for name, (total, count) in zip(names, parallel.all_reduce_sum(local).tolist()):
                self.values[name] = total / count if count else float("nan")
        return self.values


class RunLog:
    """Where a step's values go: ``log.jsonl`` (every step), the console (every ``log_every``) and wandb (optional);
    only the main rank writes."""

    def __init__(self, logdir: Path, tr: TrainingConfig, *, is_main: bool, use_wandb: bool = False):
        self.file = Path(logdir) / LOG_FILE
        self.tr, self.is_main = tr, is_main
        self.wandb = self._init_wandb(Path(logdir)) if use_wandb and is_main else None

    def _init_wandb(self, logdir: Path):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed (pip install wandb); logging to %s only", self.file)
            return None
        return wandb.init(project=self.tr.wandb_project, dir=str(logdir), name=logdir.name,
                          config={"training": vars(self.tr)})

    def write(self, values: dict, step: int) -> None:
        if not self.is_main:
            return
        clean = {k: (v if isinstance(v, (int, str)) else round(float(v), 6)) for k, v in values.items()}
        with self.file.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if step % self.tr.log_every == 0:
            log.info(" ".join(f"{k}={v}" for k, v in clean.items()))
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
