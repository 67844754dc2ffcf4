"""Compile timings of the Wan blocks: per-block time eager vs compiled, compile time cold vs warm.

Cold and warm are separate processes sharing one inductor cache folder (a fresh one unless ``--cache_dir``
names one): the first compiles from scratch, the second loads what the first stored, as a second run of
``inference.py`` with the same config would. Each process streams ``--frames`` latent frames through the
pipeline's block loop (``BlockDenoiser``: 4 denoising steps and the context pass per block) with random
weights. Its first compiled stream carries the compilation; ``compile_s`` is that stream's wall time minus
a steady compiled stream's. Per-block times are medians over the blocks whose window is full, from
``--pairs`` eager / compiled streams run alternately (so a change in machine load hits both).

    python scripts/compile_timing.py                  # CPU, 4 layers, dim 256, 16x24 latents, 1 thread
    python scripts/compile_timing.py --device cuda --flavor 1.3B --height 60 --width 104 --mode max-autotune

Prints a table on stderr and one JSON line on stdout. See docs/benchmarks.md, "Compile".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flavor", default="tiny", choices=["tiny", "1.3B", "14B"],
                   help="Wan size; tiny is reshaped by --layers / --dim / --heads")
    p.add_argument("--layers", type=int, default=4, help="layers of the tiny flavor")
    p.add_argument("--dim", type=int, default=256, help="width of the tiny flavor")
    p.add_argument("--heads", type=int, default=2, help="heads of the tiny flavor (head_dim 128 as in Wan)")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=24, help="latent width")
    p.add_argument("--frames", type=int, default=15, help="latent frames per stream (3 per block)")
    p.add_argument("--pairs", type=int, default=3, help="alternating eager / compiled streams timed")
    p.add_argument("--mode", default="default", help="torch.compile mode (see reward_forcing/compile.py)")
    p.add_argument("--rope_precision", default="float64", choices=["float64", "float32"],
                   help="RoPE arithmetic (model.rope_precision): float64 complex as the reference, or float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--cache_dir", default=None,
                   help="inductor cache folder shared by the two processes (default: a fresh temporary one)")
    p.add_argument("--child", default=None, choices=["cold", "warm"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.frames < 9 or args.frames % 3:
        p.error(f"--frames {args.frames} must be a multiple of 3 and >= 9 (the window must fill)")
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    return args


def measure(args) -> dict:
    """One process: compile, stream, time (runs in a child with TORCHINDUCTOR_CACHE_DIR already set)."""
    import torch

    from reward_forcing.build import resolve_device, resolve_dtype
    from reward_forcing.compile import CompileCounters, compile_cache_dir
    from reward_forcing.denoising import BlockDenoiser
    from reward_forcing.models.wan import WanModel, init_random_
    from reward_forcing.schedule import FlowMatchSchedule

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shape = {} if args.flavor != "tiny" else dict(num_layers=args.layers, dim=args.dim, ffn_dim=4 * args.dim,
                                                   num_heads=args.heads, text_dim=4096)
    with torch.device("meta"):
        model = WanModel.from_flavor(args.flavor, **shape)
    model = init_random_(model.to_empty(device="cpu"), seed=0).to(device=device, dtype=dtype).eval()
    model.rope.precision = getattr(torch, args.rope_precision)
    schedule = FlowMatchSchedule(5.0)
    denoiser = BlockDenoiser(model, schedule, schedule.warp([1000.0, 750.0, 500.0, 250.0]))
    rng = torch.Generator().manual_seed(0)
    text = model.prepare_context(torch.randn(1, 32, model.config.text_dim, generator=rng).to(device, dtype))
    noise = torch.randn(1, args.frames, 16, args.height, args.width, generator=rng).to(device, dtype)
    cache = model.new_kv_cache(1, args.height, args.width)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stream() -> tuple[float, list[float]]:
        cache.reset()
        blocks = []
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for s in range(0, args.frames, 3):
                t0 = time.perf_counter()
                denoiser.denoise_block(noise[:, s:s + 3], text, cache, s,
                                       lambda shape: torch.randn(shape, generator=rng))
                sync()
                blocks.append(time.perf_counter() - t0)
        return time.perf_counter() - start, blocks

    stream()  # eager warm-up: allocations, memoised tables, lazy initialisation
    before = CompileCounters.read()
    model.compile_layers(args.mode)
    first_s, _ = stream()
    compiled_first = CompileCounters.read() - before
    eager_blocks, compiled_blocks, compiled_walls = [], [], []
    for _ in range(args.pairs):
        model.uncompile_layers()
        eager_blocks += stream()[1][2:]  # blocks 2+ attend to a full 9-frame window
        model.compile_layers(args.mode)
        wall, blocks = stream()
        compiled_walls.append(wall)
        compiled_blocks += blocks[2:]
    after = CompileCounters.read() - before
    eager_ms, compiled_ms = 1e3 * statistics.median(eager_blocks), 1e3 * statistics.median(compiled_blocks)
    return {
        "compile_s": first_s - statistics.median(compiled_walls),
        "first_compiled_stream_s": first_s,
        "graphs": compiled_first.graphs, "graph_breaks": compiled_first.graph_breaks,
        "recompiles_after_first_stream": after.graphs - compiled_first.graphs,
        "cache_state": compiled_first.cache_state, "cache_dir": str(compile_cache_dir()),
        "block_ms_eager": eager_ms, "block_ms_compiled": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "fallbacks": len(model.compile_failures),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="rf-inductor-cache-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(cache_dir).resolve()),
           "OMP_NUM_THREADS": str(args.threads)}
    argv = list(sys.argv[1:] if argv is None else argv)
    result = {"load_avg_1m_before": load, "threads": args.threads, "device": args.device, "mode": args.mode,
              "rope_precision": args.rope_precision, "flavor": args.flavor, "latent": [args.height, args.width],
              "frames": args.frames}
    if args.flavor == "tiny":
        result.update(layers=args.layers, dim=args.dim, heads=args.heads)
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, *argv, "--child", run], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            print(f"error: the {run} process failed (exit {out.returncode})", file=sys.stderr)
            return 1
        result[run] = {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}
    result["load_avg_1m_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cold, warm = result["cold"], result["warm"]
    print(f"compile ({args.mode}, {args.device}, {args.threads} thread(s), RoPE {args.rope_precision}, "
          f"load {load}):\n"
          f"  graphs {cold['graphs']} (graph breaks {cold['graph_breaks']}, fallbacks {cold['fallbacks']}, "
          f"recompiles after the first stream {cold['recompiles_after_first_stream']})\n"
          f"  compile time  cold {cold['compile_s']:.1f} s ({cold['cache_state']})   warm {warm['compile_s']:.1f} s "
          f"({warm['cache_state']})\n"
          f"  per block     eager {cold['block_ms_eager']:.1f} ms   compiled {cold['block_ms_compiled']:.1f} ms   "
          f"(warm process: {warm['block_ms_eager']:.1f} / {warm['block_ms_compiled']:.1f} ms)", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
