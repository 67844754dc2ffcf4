"""Train a Reward Forcing student with Re-DMD.

    torchrun --nproc_per_node=8 train.py --config_path configs/reward_forcing.yaml --logdir logs/reward_forcing
    python train.py --config_path configs/tiny.yaml --logdir logs/tiny --disable-wandb        # CPU, tiny models

Extra ``key=value`` arguments override the config (e.g. ``training.beta=0`` for plain DMD). ``--resume``
continues from the newest checkpoint in ``<logdir>/checkpoints``; a logdir that already holds a run is
refused without ``--resume`` or ``--overwrite``. The start prints the run's budget (gradient evaluations and
optimizer steps of critic and generator). Training assets (14B teacher, VideoReward,
ode_init.pt, VidProM prompts): ``bash download_checkpoints.sh --train``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from reward_forcing.config import ConfigError, load_config, to_yaml
from reward_forcing.data import read_prompts
from reward_forcing.training import parallel
from reward_forcing.training.build import build_training_models
from reward_forcing.training.run import CONFIG_FILE, previous_run, remove_previous_run, training_budget
from reward_forcing.training.trainer import Trainer, TrainingDiverged

log = logging.getLogger("train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Re-DMD training of a streaming Reward Forcing student.",
                                epilog="Extra key=value arguments override the config, e.g. training.beta=0 "
                                       "(plain DMD) or training.rollout_sink_policy=ema.")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml", help="YAML config (see configs/)")
    p.add_argument("--logdir", required=True, help="run folder: log.jsonl, checkpoints/, checkpoint_model_*/")
    p.add_argument("--disable-wandb", "--disable_wandb", dest="disable_wandb", action="store_true",
                   help="no wandb logging (the JSONL log and console are always written)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the logdir "
                       "(on any number of ranks)")
    again.add_argument("--overwrite", action="store_true", help="delete the earlier run in the logdir (log, "
                       "checkpoints, exports, samples) and start afresh")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    dist = parallel.init_distributed()
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return run(args, dist)
    finally:
        parallel.cleanup()  # after run() returned: the sharded models are released by then


def run(args: argparse.Namespace, dist: parallel.DistInfo) -> int:
    logdir = Path(args.logdir)
    try:  # everything a user can get wrong is checked before any model is built
        cfg = load_config(args.config_path, args.overrides)
        # dmd trains on prompts; ode and teacher modes read latent videos (training.ode_pairs_path / latent_data)
        prompts = [p.conditioning for p in read_prompts(cfg.training.data_path)] if cfg.training.mode == "dmd" else []
        budget = training_budget(cfg.training, dist.world_size)
        earlier = previous_run(logdir)
        if earlier and not (args.resume or args.overwrite):
            raise FileExistsError(f"{logdir} already holds a run ({', '.join(p.name for p in earlier)}); continue "
                                  "it with --resume, replace it with --overwrite, or choose another --logdir")
        log.info("training budget: %s", budget)
        gpu = dist.device.type == "cuda"
        frozen_dtype = torch.bfloat16 if gpu and cfg.training.mixed_precision else torch.float32
        models = build_training_models(cfg, device=dist.device, dtype=torch.float32, frozen_dtype=frozen_dtype)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    models = parallel.parallelize(models, cfg, dist)
    if dist.is_main:
        if args.overwrite:
            remove_previous_run(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / CONFIG_FILE).write_text(to_yaml(cfg))
    parallel.barrier()
    trainer = Trainer(cfg, models, prompts, logdir, dist=dist, use_wandb=not args.disable_wandb, resume=args.resume)
    try:
        trainer.train()
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("done: %d steps, checkpoints in %s", trainer.step, trainer.ckpt_dir)
    return 0

if __name__ == "__main__":
    sys.exit(main())
