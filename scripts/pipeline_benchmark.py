#!/usr/bin/env python
"""Pipeline-parallel streaming benchmark: per-rank busy time, bubble fraction and bytes sent per block.

    python scripts/pipeline_benchmark.py                                     # one process: the baseline
    torchrun --nproc_per_node 2 scripts/pipeline_benchmark.py                # 2 stages, one stream
    torchrun --nproc_per_node 2 scripts/pipeline_benchmark.py --batch 4 --micro_batches 4
    torchrun --nproc_per_node 4 scripts/pipeline_benchmark.py --config_path configs/reward_forcing.yaml \
        model.random_init=true --dtype bf16                                  # 1.3B at 832x480, 4 GPUs

Random weights (``model.random_init=true`` is forced: speed does not depend on weight values), a random
text-encoder output as the context, latents only (no VAE: the decoder runs on rank 0 outside the pipeline and
is timed by scripts/benchmark.py). Under torchrun the generator is split with ``model.pipeline_parallel``
(reward_forcing/pipeline_parallel.py); one process runs the whole model, the baseline the stages are compared
with. Each block is timed on every rank (the device synchronised at block boundaries); a stage's busy time is
the time in its own layers (and the head), with the device synchronised around them.

Per rank: ``busy_ms`` per block, ``bubble`` = 1 - busy / block time (the share of the block the rank waits),
``sent_mb`` per block (hidden states to the next stage; the last stage's broadcast of the flow). The expected
figures are in docs/multi_gpu.md. Output: a table on stderr, one JSON record as the last line of stdout (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from reward_forcing.benchmark.report import environment  # noqa: E402
from reward_forcing.benchmark.runner import benchmark_device  # noqa: E402
from reward_forcing.benchmark.timing import Clock, median  # noqa: E402
from reward_forcing.build import build_pipeline, resolve_dtype  # noqa: E402
from reward_forcing.config import ConfigError, load_config  # noqa: E402
from reward_forcing.pipeline_parallel import WanPipelineStage, init_from_env  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Run under torchrun for N stages; plain python gives the 1-stage baseline.")
    p.add_argument("--config_path", default="configs/tiny.yaml", help="the model, cache, schedule and video size")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as in inference.py")
    p.add_argument("--batch", type=int, default=1, help="streams generated together (the batch)")
    p.add_argument("--micro_batches", type=int, default=None,
                   help="parts the batch is split into through the stages (model.pipeline_micro_batches; "
                        "default: the config's)")
    p.add_argument("--blocks", type=int, default=7, help="blocks per run (7 = 21 latent frames)")
    p.add_argument("--warmup_blocks", type=int, default=2, help="leading blocks left out of the medians")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one untimed warm-up run")
    p.add_argument("--device", default="auto", help="auto (cuda if available; under torchrun cuda:LOCAL_RANK), cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per process (CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON record to PATH (rank 0)")
    args = p.parse_intermixed_args(argv)
    for name in ("batch", "blocks", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be >= 1")
    if not 0 <= args.warmup_blocks < args.blocks:
        p.error(f"--warmup_blocks {args.warmup_blocks} must be in [0, --blocks {args.blocks})")
    return args


def run(args: argparse.Namespace) -> dict | None:
    if args.threads:
        torch.set_num_threads(args.threads)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = benchmark_device(f"cuda:{local}" if args.device == "auto" and torch.cuda.is_available() else args.device)
    dtype = resolve_dtype(args.dtype, device)
    rank, world = init_from_env(device)
    overrides = [*args.overrides, "model.random_init=true", f"model.pipeline_parallel={world > 1}"]
    if args.micro_batches is not None:
        overrides.append(f"model.pipeline_micro_batches={args.micro_batches}")
    cfg = load_config(args.config_path, overrides)
    pipe = build_pipeline(cfg, device=device, dtype=dtype, text_encoder_device="meta")
    generator = pipe.generator
    context = torch.randn((args.batch, generator.config.text_len, generator.config.text_dim),
                          generator=torch.Generator().manual_seed(0)).to(device, dtype)
    staged = isinstance(generator, WanPipelineStage)
    if staged:
        generator.timing = True
    clock = Clock(device)
    frames = args.blocks * pipe.frames_per_block

    def one_run() -> list[float]:
        times, start = [], clock.sync()
        for _ in pipe.stream(context=context, num_frames=frames, decode=False):
            now = clock.sync()
            times.append(now - start)
            start = now
        return times

    with torch.inference_mode():
        one_run()  # warm-up
        if staged:
            generator.stats.reset()
        runs = [one_run() for _ in range(args.repeats)]
    steady = [t for times in runs for t in times[args.warmup_blocks:]]
    blocks = args.repeats * args.blocks
    mine = {"rank": rank, "layers": [generator.held_layers.start, generator.held_layers.stop],
            "block_ms": 1e3 * median(steady), "block_ms_mean": 1e3 * sum(t for r in runs for t in r) / blocks}
    if staged:
        stats = generator.stats
        mine.update(busy_ms=1e3 * stats.busy_s / blocks, sent_mb=stats.bytes_sent / blocks / 2**20,
                    forwards_per_block=stats.forwards / blocks)
        mine["bubble"] = 1 - mine["busy_ms"] / mine["block_ms_mean"]
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    else:
        ranks = [mine]
    if rank != 0:
        return None
    frames_per_block = 4 * pipe.frames_per_block  # video frames of a steady-state block (Wan VAE, 4x in time)
    block_s = max(r["block_ms"] for r in ranks) / 1e3
    return {"config_path": args.config_path, "overrides": list(args.overrides), **environment(device, dtype),
            "stages": world, "batch": args.batch, "micro_batches": cfg.model.pipeline_micro_batches if world > 1 else 1,
            "flavor": cfg.model.generator, "height": cfg.video.height, "width": cfg.video.width,
            "blocks": args.blocks, "warmup_blocks": args.warmup_blocks, "repeats": args.repeats,
            "block_ms": 1e3 * block_s, "fps_per_stream": frames_per_block / block_s,
            "fps_total": args.batch * frames_per_block / block_s, "ranks": ranks}


def format_table(rec: dict) -> str:
    lines = [f"{rec['flavor']} at {rec['width']}x{rec['height']}, {rec['stages']} stage(s), batch {rec['batch']} in "
             f"{rec['micro_batches']} micro-batch(es): {rec['block_ms']:.1f} ms per block, "
             f"{rec['fps_per_stream']:.1f} FPS per stream, {rec['fps_total']:.1f} FPS in all (DiT only)",
             "| rank | layers | block ms | busy ms | bubble | sent MB / block |", "|---|---|---|---|---|---|"]
    for r in rec["ranks"]:
        busy = f"{r['busy_ms']:.1f}" if "busy_ms" in r else "-"
        bubble = f"{r['bubble']:.2f}" if "bubble" in r else "-"
        sent = f"{r['sent_mb']:.2f}" if "sent_mb" in r else "-"
        lines.append(f"| {r['rank']} | {r['layers'][0]}-{r['layers'][1] - 1} | {r['block_ms']:.1f} | {busy} | "
                     f"{bubble} | {sent} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rec = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rec is not None:
        print(format_table(rec), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
