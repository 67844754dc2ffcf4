#!/usr/bin/env python
"""Streaming speed benchmark: time to first frame, steady-state FPS, per-block breakdown, peak memory.

    python scripts/benchmark.py                                            # tiny flavor on whatever device
    python scripts/benchmark.py --config_path configs/reward_forcing.yaml  # exactly what that config runs
    python scripts/benchmark.py --flavor 1.3B --vae wan2.1 --dtype bf16 --device cuda --repeats 5
    python scripts/benchmark.py --flavor 1.3B --vae wan2.1 --text_encoder umt5-xxl --offload_text_encoder

Every model gets **random weights** (no checkpoint, no download): speed does not depend on weight values. The
models are what ``reward_forcing/build.py`` builds from the config with ``model.random_init=true`` and the flags
applied as ``key=value`` overrides: the 1.3B/14B DiT and umt5-xxl are allocated directly on the target device in
the target dtype and filled with random values there; the tiny models and the Wan2.1 VAE (127M parameters) get
their usual init on the CPU. With ``--config_path`` the models, cache, schedule and video size are the config's
(``key=value`` overrides as in inference.py); the flags below override single settings (``--flavor`` etc. are
shortcuts).

What is timed is :meth:`StreamingPipeline.stream` itself: the pipeline calls a phase hook as each phase starts
(``prepare_context``, then per block ``steps``, ``context``, ``decode``, ``block_end``), and the benchmark turns
those calls into timing marks, so its figures cannot drift from what users run. KV-cache memory is read from
the cache object.

Output: a readable table on **stderr** and one JSON record as the **last line of stdout** (the only line),
so ``python scripts/benchmark.py ... | tail -1 | python -m json.tool`` works; ``--json PATH`` also writes it.
See docs/benchmarks.md for what each number includes.

Timing: ``time.perf_counter`` on the host; on CUDA the device is synchronised only at block boundaries (and
around text encoding) and the split of a block into denoising / context pass / VAE decode comes from CUDA
events, so the breakdown adds no host syncs. One untimed warm-up run (``--warmup_runs``) precedes the
``--repeats`` timed runs; its time to first frame is reported as ``ttff_cold_s``. Per-block figures are
medians over the steady-state blocks (index >= ``--warmup_blocks``) of all timed runs.

This file is the command line only; the benchmark is ``reward_forcing/benchmark/`` (settings, runner, timing,
memory, flops, report).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))

from reward_forcing.benchmark.report import format_table  # noqa: E402
from reward_forcing.benchmark.runner import BenchmarkError, run_streaming_benchmark  # noqa: E402
from reward_forcing.benchmark.settings import DEFAULT_PROMPT, resolve_settings  # noqa: E402
from reward_forcing.compile import COMPILE_FALLBACKS, COMPILE_MODES  # noqa: E402
from reward_forcing.config import ConfigError  # noqa: E402
from reward_forcing.models.kv_cache import SINK_POLICIES  # noqa: E402


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the unset (None) and off (False) ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark streaming generation (random weights, no download): time to first frame, "
                    "steady-state FPS (DiT / DiT + VAE / with text encoding), per-block breakdown, peak memory. "
                    "Table on stderr, one JSON line on stdout. Without --config_path: the reference run's cache "
                    "and schedule with the tiny flavor; flags override single settings.",
        formatter_class=_HelpFormatter)
    p.add_argument("--config_path", default=None,
                   help="benchmark exactly what this config runs: generator flavor, VAE, text encoder, cache, "
                        "schedule, video size, rope precision, compile")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as in inference.py")
    g = p.add_argument_group("models (default: the config's; without one, the tiny flavor)")
    g.add_argument("--flavor", default=None, choices=["tiny", "1.3B", "14B"], help="generator (causal DiT) size")
    g.add_argument("--vae", default=None, choices=["tiny", "wan2.1"],
                   help="VAE decoder; default: tiny for the tiny flavor, wan2.1 (real architecture) otherwise")
    g.add_argument("--text_encoder", default=None, choices=["none", "tiny", "umt5-xxl"],
                   help="none: a random context tensor, no encoding time (the default without a config); tiny: "
                        "the 32-dim test encoder (tiny flavor only); umt5-xxl: the real 5.7B architecture with "
                        "random weights (~11.4 GB in bf16)")
    g.add_argument("--offload_text_encoder", action="store_true", default=None,
                   help="move the text encoder to the CPU after encoding (peak_mem_gb then excludes it)")
    g.add_argument("--rope_precision", default=None, choices=["float64", "float32"],
                   help="RoPE arithmetic: float64 complex (reference numerics) or float32 real (faster on GPU)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the generator's blocks")
    g.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (max-autotune, reduce-overhead: CUDA graphs on a GPU); "
                        "default: the config's model.compile_mode")
    g.add_argument("--compile_fallback", default=None, choices=COMPILE_FALLBACKS,
                   help="a failed compile: error (stop) or eager (warn, benchmark eager; compile_fallbacks "
                        "counts it); default: the config's model.compile_fallback")
    g.add_argument("--compile_cache_dir", default=None, metavar="DIR",
                   help="inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR): the first run with a folder "
                        "compiles cold, later ones load from it (compile_cache in the JSON says which)")
    g.add_argument("--cudnn_benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (autotuned VAE convolutions; the pipeline and "
                        "inference.py leave it off)")
    g = p.add_argument_group("video and cache (default: the config's)")
    g.add_argument("--height", type=int, default=None, help="pixels; default 480 (48 for the tiny flavor)")
    g.add_argument("--width", type=int, default=None, help="pixels; default 832 (80 for the tiny flavor)")
    g.add_argument("--num_frames", type=int, default=None,
                   help="LATENT frames, a multiple of --frames_per_block (21 -> 81 video frames)")
    g.add_argument("--frames_per_block", type=int, default=None, help="latent frames per block (3 -> 12 video frames)")
    g.add_argument("--local_attn_size", type=int, default=None,
                   help="attention window in latent frames, sink included; -1 = global")
    g.add_argument("--sink_size", type=int, default=None, help="sink frames")
    g.add_argument("--sink_policy", default=None, choices=SINK_POLICIES,
                   help="what happens to evicted frames (ema: folded into the sink)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the text encoder (ignored with none)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the context stand-in and the noise (the weights are build.py's random init)")
    g = p.add_argument_group("measurement")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU (all models run in this dtype)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs; figures are medians over them")
    g.add_argument("--warmup_runs", type=int, default=1, help="untimed runs before the timed ones")
    g.add_argument("--warmup_blocks", type=int, default=1,
                   help="leading blocks of each run excluded from the steady-state figures")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the JSON record to PATH")
    args = p.parse_intermixed_args(argv)
    try:
        resolve_settings(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rec = run_streaming_benchmark(args)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rec), file=sys.stderr, flush=True)
    line = json.dumps(rec, sort_keys=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
