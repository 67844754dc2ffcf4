"""Run under torchrun by tests/test_trainer.py: tiny Re-DMD training on several CPU ranks (gloo, FSDP2).

Writes <logdir>/ranks.json with every rank's checksum of the full (all-gathered) generator and critic, so the
test can check that the ranks hold one model.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reward_forcing.build import build_training_models
from reward_forcing.config import load_config
from reward_forcing.training import distributed as dist_utils
from reward_forcing.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def checksum(module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective on every rank
        total += full.detach().double().abs().sum()
    return float(total)


def main(logdir: str, *overrides: str) -> None:
    info = dist_utils.init_distributed()
    cfg = load_config(REPO / "configs" / "tiny.yaml", list(overrides))
    models = build_training_models(cfg)
    models.generator = dist_utils.shard_model(models.generator, mixed_precision=False)
    models.critic = dist_utils.shard_model(models.critic, mixed_precision=False)
    models.teacher = dist_utils.shard_frozen(models.teacher, mixed_precision=False)
    prompts = ["a fox runs", "a car drives", "waves crash", "a bird flies", "a dancer spins"]
    trainer = Trainer(cfg, models, prompts, logdir, dist=info)
    trainer.train()
    sums = [None] * info.world_size
    dist.all_gather_object(sums, {"generator": checksum(models.generator), "critic": checksum(models.critic)})
    if info.is_main:
        (Path(logdir) / "ranks.json").write_text(json.dumps({"ranks": sums, "step": trainer.step}))
    dist_utils.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:])
