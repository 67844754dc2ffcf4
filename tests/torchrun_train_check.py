"""Run under torchrun by tests/test_trainer.py: tiny Re-DMD training on several CPU ranks (gloo, FSDP2).

Writes <logdir>/ranks.json with every rank's checksum of the full (all-gathered) generator and critic, so the
test can check that the ranks hold one model.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reward_forcing.config import load_config
from reward_forcing.training import parallel
from reward_forcing.training.build import build_training_models
from reward_forcing.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def checksum(module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective on every rank
        total += full.detach().double().abs().sum()
    return float(total)


def train_and_check(info: parallel.DistInfo, logdir: str, overrides: list[str]) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    models = parallel.parallelize(build_training_models(cfg), cfg, info)  # as train.py does
    prompts = ["a fox runs", "a car drives", "waves crash", "a bird flies", "a dancer spins"]
    trainer = Trainer(cfg, models, prompts, logdir, dist=info)
    trainer.train()
    sums = [None] * info.world_size
    dist.all_gather_object(sums, {"generator": checksum(models.generator), "critic": checksum(models.critic),
                                  "sharded": hasattr(models.generator.head.head.weight, "full_tensor")})
    if info.is_main:
        (Path(logdir) / "ranks.json").write_text(json.dumps({"ranks": sums, "step": trainer.step}))


def main(logdir: str, *overrides: str) -> None:
    info = parallel.init_distributed()
    try:
        train_and_check(info, logdir, list(overrides))
    finally:
        parallel.cleanup()  # after train_and_check returned, so the sharded models are released


if __name__ == "__main__":
    main(*sys.argv[1:])
