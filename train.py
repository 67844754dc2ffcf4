"""Train a Reward Forcing student with Re-DMD.

    torchrun --nproc_per_node=8 train.py --config_path configs/reward_forcing.yaml --logdir logs/reward_forcing
    python train.py --config_path configs/tiny.yaml --logdir logs/tiny --disable-wandb        # CPU, tiny models

Extra ``key=value`` arguments override the config (e.g. ``training.beta=0`` for plain DMD). ``--resume``
continues from the newest checkpoint in ``<logdir>/checkpoints``. Training assets (14B teacher, VideoReward,
ode_init.pt, VidProM prompts): ``bash download_checkpoints.sh --train``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from reward_forcing.build import build_training_models
from reward_forcing.config import ConfigError, load_config, to_yaml
from reward_forcing.data import read_prompts
from reward_forcing.training import distributed as dist_utils
from reward_forcing.training.trainer import Trainer, TrainingDiverged, per_rank_batch_size

log = logging.getLogger("train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Re-DMD training of a streaming Reward Forcing student.",
                                epilog="Extra key=value arguments override the config, e.g. training.beta=0 "
                                       "(plain DMD) or training.rollout_sink_policy=ema.")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml", help="YAML config (see configs/)")
    p.add_argument("--logdir", required=True, help="run folder: log.jsonl, checkpoints/, checkpoint_model_*/")
    p.add_argument("--disable-wandb", "--disable_wandb", dest="disable_wandb", action="store_true",
                   help="no wandb logging (the JSONL log and console are always written)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the logdir")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    dist = dist_utils.init_distributed()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config_path, args.overrides)
        prompts = [p.conditioning for p in read_prompts(cfg.training.data_path)]
        per_rank_batch_size(cfg.training, dist.world_size)  # fail before building models
        gpu = dist.device.type == "cuda"
        frozen_dtype = torch.bfloat16 if gpu and cfg.training.mixed_precision else torch.float32
        models = build_training_models(cfg, device=dist.device, dtype=torch.float32, frozen_dtype=frozen_dtype)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        dist_utils.cleanup()
        return 2
    if dist.distributed:
        mp = cfg.training.mixed_precision and gpu
        models.generator = dist_utils.shard_model(models.generator, mixed_precision=mp)
        models.critic = dist_utils.shard_model(models.critic, mixed_precision=mp)
        models.teacher = dist_utils.shard_frozen(models.teacher, mixed_precision=mp)
    logdir = Path(args.logdir)
    if dist.is_main:
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / "config.yaml").write_text(to_yaml(cfg))
    trainer = Trainer(cfg, models, prompts, logdir, dist=dist, use_wandb=not args.disable_wandb, resume=args.resume)
    try:
        trainer.train()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        dist_utils.cleanup()
    log.info("done: %d steps, checkpoints in %s", trainer.step, trainer.ckpt_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
