"""Sample the teacher and store its ODE trajectories at the student's timesteps: the data of the ODE init.

    python scripts/generate_ode_pairs.py --config_path configs/toy/ode.yaml --out runs/toy/ode_pairs.pt \
        --num_samples 1024
    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py --config_path configs/X.yaml --out pairs.pt ...

For each prompt (drawn in order, cycling, from ``training.data_path``)
the teacher (``model.teacher`` with ``training.teacher_ckpt``, or its base weights) runs ``--steps``-step Euler
with CFG ``training.guidance_scale`` on the shifted grid of ``schedule.timestep_shift``, and the states at the
student's warped timesteps are kept with the clean sample. The output ``{"states": [N, S + 1, F, C, h, w],
"prompts", "timesteps"}`` is what ``training.mode=ode`` (``training.ode_pairs_path``) reads. Under torchrun each
rank samples its share and rank 0 writes the file. Extra ``key=value`` arguments override the config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_forcing.build import build_dit, build_text_encoder, build_vae  # noqa: E402
from reward_forcing.checkpoints import require_file  # noqa: E402
from reward_forcing.config import ConfigError, load_config  # noqa: E402
from reward_forcing.data import read_prompts  # noqa: E402
from reward_forcing.file_io import atomic_save  # noqa: E402
from reward_forcing.sampling import sample_teacher  # noqa: E402
from reward_forcing.schedule import FlowMatchSchedule  # noqa: E402
from reward_forcing.training import parallel  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample teacher ODE trajectories at the student's timesteps "
                                "(the data of training.mode=ode).")
    p.add_argument("--config_path", required=True, help="YAML config (model.teacher, training.teacher_ckpt, "
                   "schedule, video size, training.num_training_frames)")
    p.add_argument("--out", required=True, help="output .pt file (written atomically)")
    p.add_argument("--num_samples", type=int, default=1024, help="trajectories to sample (default 1024)")
    p.add_argument("--steps", type=int, default=48, help="Euler steps of the teacher (default 48)")
    p.add_argument("--batch_size", type=int, default=32, help="trajectories per teacher batch (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = parallel.init_distributed()
    try:
        return run(args, dist)
    finally:
        parallel.cleanup()


def run(args: argparse.Namespace, dist: parallel.DistInfo) -> int:
    device = dist.device
    try:
        cfg = load_config(args.config_path, args.overrides)
        if args.num_samples < 1 or args.steps < 1 or args.batch_size < 1:
            raise ValueError("--num_samples, --steps and --batch_size must be >= 1")
        prompts = [p.conditioning for p in read_prompts(cfg.training.data_path)]
        weights = require_file(cfg.training.teacher_ckpt, "teacher (training.teacher_ckpt)", train=True) \
            if cfg.training.teacher_ckpt else None
        teacher = build_dit(cfg, cfg.model.teacher, weights=weights, seed=1, device=device, what="teacher")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    teacher.eval().requires_grad_(False)
    text = build_text_encoder(cfg, device=device)
    schedule = FlowMatchSchedule(cfg.schedule.timestep_shift)
    timesteps = schedule.denoising_timesteps(cfg.schedule.denoising_step_list, cfg.schedule.warp_denoising_step)
    h, w = build_vae(cfg).latent_size(cfg.video.height, cfg.video.width)
    shape = (cfg.training.num_training_frames, teacher.config.in_dim, h, w)
    chosen = [prompts[i % len(prompts)] for i in range(args.num_samples)]
    mine = list(range(dist.rank, args.num_samples, dist.world_size))  # each rank samples its share
    all_states = []
    for start in tqdm(range(0, len(mine), args.batch_size), desc="ode pairs", unit="batch",
                      disable=not dist.is_main):
        index = mine[start:start + args.batch_size]
        batch = [chosen[i] for i in index]
        # Noise of trajectory i is drawn from seed + i, so the file does not depend on the number of ranks beyond
        # float32 rounding (other batch compositions: 1.5e-5 apart on the toy, 1 vs 2 ranks).
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + i))
                             for i in index]).to(device)
        context = text(batch).to(device)
        negative = text.encode_negative(cfg.text.negative_prompt, len(batch)).to(device)
        x0, states = sample_teacher(teacher, noise, context, negative, num_steps=args.steps,
                                    shift=cfg.schedule.timestep_shift, guidance_scale=cfg.training.guidance_scale,
                                    record=timesteps)
        all_states.append(torch.cat([states, x0[:, None]], 1).cpu())
    states = torch.cat(all_states)
    if dist.distributed:  # rank 0 puts every rank's trajectories back in sample order
        parts = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, (mine, states))
        order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()
        states = torch.cat([s for _, s in parts])[order]
    if not dist.is_main:
        return 0
    out = {"states": states, "prompts": chosen, "timesteps": torch.tensor(timesteps)}
    path = atomic_save(out, args.out)
    print(f"wrote {len(chosen)} trajectories {tuple(out['states'].shape[1:])} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
