#!/usr/bin/env python
"""Streaming speed benchmark: time to first frame, steady-state FPS, per-block breakdown, peak memory.

    python scripts/benchmark.py                                            # tiny flavor on whatever device
    python scripts/benchmark.py --config_path configs/reward_forcing.yaml  # exactly what that config runs
    python scripts/benchmark.py --flavor 1.3B --vae wan2.1 --dtype bf16 --device cuda --repeats 5
    python scripts/benchmark.py --flavor 1.3B --vae wan2.1 --text_encoder umt5-xxl --offload_text_encoder

Every model gets **random weights** (no checkpoint, no download): speed does not depend on weight values. The
1.3B/14B DiT and umt5-xxl are allocated directly on the target device in the target dtype and filled with
normal noise there; the tiny models and the Wan2.1 VAE (127M parameters) get their usual init on the CPU.
With ``--config_path`` the models, cache, schedule and video size are the config's (``key=value`` overrides
as in inference.py); the flags below override single settings (``--flavor`` etc. are shortcuts).

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
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))

from reward_forcing.compile import (COMPILE_FALLBACKS, COMPILE_MODES, CompileCounters,  # noqa: E402
                                    compile_cache_dir, set_compile_cache_dir)
from reward_forcing.config import ConfigError, load_config  # noqa: E402
from reward_forcing.models.attention import attention_backend_name  # noqa: E402
from reward_forcing.models.kv_cache import SINK_POLICIES, CausalSpec  # noqa: E402
from reward_forcing.models.text_encoder import TextEncoder, build_tiny_tokenizer, umt5_xxl_config  # noqa: E402
from reward_forcing.models.vae import WAN21_VAE_ARCH, WanVAE  # noqa: E402
from reward_forcing.models.wan import WanConfig, WanModel, init_random_  # noqa: E402
from reward_forcing.pipeline import StreamingPipeline  # noqa: E402
from reward_forcing.streaming import StreamSettings  # noqa: E402

SCHEMA = "reward-forcing-benchmark/1"
GB = 1e9  # memory figures are in GB = 10^9 bytes
DEFAULT_PROMPT = "A red fox trots through fresh snow in a quiet pine forest at dawn, soft golden light."
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BenchmarkError(Exception):
    """A bad combination of options, reported without a traceback."""


# ------------------------------------------------------------------------------------------------ CLI
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
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the context stand-in and the noise")
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


def resolve_settings(args: argparse.Namespace) -> None:
    """Fill every unset flag from the config (``--config_path``, or the schema defaults with the tiny flavor) and
    check the combination; sets ``args.cfg`` (the resolved config) and ``args.spec`` (the causal spec)."""
    cfg = load_config(args.config_path, args.overrides)
    model = cfg.model
    if args.config_path is None:  # shortcuts: the reference run's cache and schedule on the tiny flavor
        args.flavor = args.flavor or "tiny"
        args.text_encoder = args.text_encoder or "none"
    args.flavor = args.flavor or model.generator
    real = args.flavor != "tiny"
    from_config = args.config_path is not None
    args.vae = args.vae or (("tiny" if model.vae == "tiny" else "wan2.1") if from_config else
                            ("wan2.1" if real else "tiny"))
    args.text_encoder = args.text_encoder or ("tiny" if model.text_encoder == "tiny" else "umt5-xxl")
    args.offload_text_encoder = bool(cfg.text.offload_text_encoder if args.offload_text_encoder is None
                                     else args.offload_text_encoder)
    args.rope_precision = args.rope_precision or model.rope_precision
    args.compile = bool(model.compile if args.compile is None else args.compile)
    args.compile_mode = args.compile_mode or model.compile_mode
    args.compile_fallback = args.compile_fallback or model.compile_fallback
    default_h, default_w = (cfg.video.height, cfg.video.width) if from_config else ((480, 832) if real else (48, 80))
    args.height = args.height or default_h
    args.width = args.width or default_w
    args.num_frames = args.num_frames if args.num_frames is not None else cfg.video.num_output_frames
    causal = cfg.causal
    args.frames_per_block = args.frames_per_block or causal.frames_per_block
    args.local_attn_size = args.local_attn_size if args.local_attn_size is not None else causal.local_attn_size
    args.sink_size = args.sink_size if args.sink_size is not None else causal.sink_size
    args.sink_policy = args.sink_policy or causal.sink_policy
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        raise ValueError(f"--height x --width {args.height}x{args.width} must be positive multiples of 16")
    if args.frames_per_block < 1 or args.num_frames < 1 or args.num_frames % args.frames_per_block:
        raise ValueError(f"--num_frames {args.num_frames} must be a positive multiple of --frames_per_block "
                         f"{args.frames_per_block}")
    if args.repeats < 1 or args.warmup_runs < 0 or args.warmup_blocks < 0:
        raise ValueError("--repeats must be >= 1, --warmup_runs and --warmup_blocks >= 0")
    if args.compile and args.warmup_runs < 1:
        raise ValueError("--compile needs --warmup_runs >= 1 (compilation happens in the warm-up run)")
    if args.num_frames // args.frames_per_block <= args.warmup_blocks:
        raise ValueError(f"{args.num_frames // args.frames_per_block} block(s) leave no steady-state block after "
                         f"--warmup_blocks {args.warmup_blocks}: raise --num_frames")
    args.spec = CausalSpec(args.frames_per_block, args.local_attn_size, args.sink_size, args.sink_policy,
                           causal.ema_alpha)
    args.cfg = cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError(f"--device {name}: no CUDA GPU is available (torch {torch.__version__}, CUDA "
                                 f"build {torch.version.cuda}); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise BenchmarkError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# --------------------------------------------------------------------------------------- random models
@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``init_random_``'s distributions drawn in place on the parameters' own device (fast for big models):
    modulation N(0, .2^2), norm weights 1 + N(0, .1^2), biases N(0, .05^2), other weights N(0, 1/fan_in)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("modulation"):
            p.normal_(0.0, 0.2, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.05, generator=gen)
        else:  # fan_in = elements per output row
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel() if p.dim() > 1 else 1), generator=gen)
    return model


def _materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A meta-device model -> uninitialised storage of ``dtype`` on ``device`` (no CPU copy, no fp32 detour)."""
    return model.to(dtype=dtype).to_empty(device=device)


def build_generator(flavor: str, spec: CausalSpec, device: torch.device, dtype: torch.dtype, seed: int = 0
                    ) -> WanModel:
    if flavor == "tiny":  # exactly the tiny debug model (configs/tiny.yaml)
        return init_random_(WanModel.from_flavor("tiny", causal=spec), seed=seed).to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = WanModel(WanConfig.from_flavor(flavor), spec)
    return fill_random_(_materialise(model, device, dtype), seed)


def build_vae(kind: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanVAE:
    if kind == "tiny":
        return WanVAE.tiny(seed).to(device=device, dtype=dtype)
    from diffusers import AutoencoderKLWan

    # The real Wan2.1 VAE architecture with diffusers' default init (127M parameters: a second or two on the
    # CPU), seeded without touching the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(**WAN21_VAE_ARCH)
    return WanVAE(model).to(device=device, dtype=dtype)


def build_text_encoder(kind: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> TextEncoder | None:
    if kind == "none":
        return None
    if kind == "tiny":
        return TextEncoder.tiny(seed).to(device=device, dtype=dtype)
    # umt5-xxl: the real architecture with random weights. The real tokenizer ships with the checkpoint, so a
    # character-level stand-in is used; every prompt is padded to 512 tokens either way, so the encoder does
    # the same work.
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        encoder = UMT5EncoderModel(umt5_xxl_config())
    encoder = _materialise(encoder, device, dtype)
    encoder.set_input_embeddings(encoder.shared)  # re-tie: to_empty gave the two users separate copies
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    return TextEncoder(encoder, build_tiny_tokenizer())


def _param_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


# ------------------------------------------------------------------------------------------- compile
def compile_fields(args, generator: WanModel, cold: "RunTiming | None", runs: list["RunTiming"],
                   warmup: CompileCounters, timed: CompileCounters) -> dict:
    """The JSON's compile figures. ``compile_s`` is the warm-up run's wall time beyond a timed run's: what
    compiling cost this process, cold (nothing in inductor's cache) or warm (everything loaded from it), as
    ``compile_cache`` says; ``compile_recompiles`` counts graphs compiled during the timed runs (0: the warm-up
    covered every shape)."""
    if not args.compile:
        return {"compile_status": "off", **dict.fromkeys(
            ["compile_mode", "compile_fallback", "compile_s", "compile_cold_s", "compile_warm_s", "compile_cache",
             "compile_cache_dir", "compile_graphs", "compile_graph_breaks", "compile_recompiles",
             "compile_fallbacks"])}
    failures = generator.compile_failures
    compile_s = cold.total_s - _median([r.total_s for r in runs]) if cold is not None else None
    state = warmup.cache_state
    return {
        "compile_status": f"eager fallback ({failures[0]})" if failures else f"on ({args.compile_mode})",
        "compile_mode": args.compile_mode, "compile_fallback": args.compile_fallback,
        "compile_s": compile_s,
        "compile_cold_s": compile_s if state == "cold" else None,
        "compile_warm_s": compile_s if state == "warm" else None,
        "compile_cache": state, "compile_cache_dir": str(compile_cache_dir()),
        "compile_graphs": warmup.graphs, "compile_graph_breaks": warmup.graph_breaks + timed.graph_breaks,
        "compile_recompiles": timed.graphs, "compile_fallbacks": len(failures),
    }


# -------------------------------------------------------------------------------------------- timing
class Clock:
    """Host time + device marks. On CUDA, ``mark`` records an event (no sync) and ``sync`` is the only
    synchronisation; on CPU both are plain ``perf_counter`` reads."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        """Elapsed seconds between two marks (CUDA: only after a sync that follows ``b``)."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


@dataclass
class BlockTiming:
    index: int
    frames: int  # decoded video frames
    calls: int  # generator forward calls (steps + context pass)
    denoise_s: float
    context_s: float
    vae_s: float
    wall_s: float  # host time from the block's start to the sync after its decode

    @property
    def dit_s(self) -> float:
        return self.denoise_s + self.context_s


@dataclass
class RunTiming:
    ttff_s: float  # generation start (prompt already encoded) -> first decoded frames, synchronised
    prepare_context_s: float  # text MLP + every layer's cross-attention K/V (inside ttff_s)
    total_s: float  # generation start -> last block decoded
    blocks: list[BlockTiming] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def timed_stream(pipe: StreamingPipeline, context: torch.Tensor, clock: Clock, *, num_frames: int, height: int,
                 width: int, seed: int = 0, keep_outputs: bool = False) -> RunTiming:
    """Time ``pipe.stream(context=context, decode=True, ...)`` itself: the pipeline's phase hook records a mark as
    each phase starts and a forward pre-hook counts generator calls; the host waits for the device only after
    each yielded block."""
    marks: list[tuple[str, object, float]] = []  # (phase, device mark, host time)
    calls = [0]
    pipe.phase_hook = lambda name: marks.append((name, clock.mark(), time.perf_counter()))
    counter = pipe.generator.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    run = RunTiming(ttff_s=0.0, prepare_context_s=0.0, total_s=0.0)
    ends, block_calls = [], []
    try:
        t0 = clock.sync()
        for chunk in pipe.stream(context=context, num_frames=num_frames, height=height, width=width, seed=seed):
            host_end = clock.sync()  # the only sync of the block
            if chunk.index == 0:
                run.ttff_s = host_end - t0
            ends.append((chunk.frames.shape[1], host_end))
            block_calls.append(calls[0])
            calls[0] = 0
            if keep_outputs:
                run.latents.append(chunk.latents)
                run.frames.append(chunk.frames)
        run.total_s = time.perf_counter() - t0
    finally:
        pipe.phase_hook = None
        counter.remove()
    # Marks: prepare_context, then per block steps, context, decode, block_end.
    run.prepare_context_s = clock.seconds(marks[0][1], marks[1][1])
    per_block = [marks[i:i + 4] for i in range(1, len(marks), 4)]
    for index, (phases, (frames, host_end), n_calls) in enumerate(zip(per_block, ends, block_calls)):
        names = [name for name, _, _ in phases]
        assert names == ["steps", "context", "decode", "block_end"], names
        (_, steps, host_start), (_, ctx, _), (_, dec, _), (_, end, _) = phases
        run.blocks.append(BlockTiming(index, frames, n_calls, clock.seconds(steps, ctx), clock.seconds(ctx, dec),
                                      clock.seconds(dec, end), host_end - host_start))
    return run


def time_text_encoding(pipe: StreamingPipeline, prompt: str, clock: Clock, repeats: int, warmup: int):
    """Median seconds of ``pipe.encode_prompts([prompt])`` (synchronised before and after) and the context."""
    times = []
    context = None
    for i in range(warmup + repeats):
        t0 = clock.sync()
        context = pipe.encode_prompts([prompt])
        t1 = clock.sync()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times), context


# -------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a phase. GPU: ``torch.cuda.max_memory_allocated`` (reset per phase); CPU: the process's
    peak RSS (VmHWM, reset per phase through /proc/self/clear_refs where the kernel allows it, otherwise the
    lifetime maximum ``ru_maxrss``). ``process_peak_bytes`` is the maximum over all phases."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "max_rss"
        self._process_peak = 0

    def reset(self) -> None:
        self._process_peak = max(self._process_peak, self.peak_bytes())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "max_rss_lifetime"  # cannot reset: the phase figure includes everything before it

    def peak_bytes(self) -> int:
        """Peak since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def process_peak_bytes(self) -> int:
        return max(self._process_peak, self.peak_bytes())


# ------------------------------------------------------------------------------------------ analysis
def dit_flops_per_call(cfg: WanConfig, tokens_per_frame: int, query_frames: int, key_frames: int) -> float:
    """Matmul FLOPs of one streaming forward (2 per multiply-add): per layer the self-attention q/k/v/o and
    cross-attention q/o projections, the FFN, and both attentions (cross-attention K/V are precomputed once
    per prompt); patch embedding, head and elementwise work are negligible and left out."""
    n, m, d = query_frames * tokens_per_frame, key_frames * tokens_per_frame, cfg.dim
    linear = 2 * n * (6 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * n * m * d + 4 * n * cfg.text_len * d
    return float(cfg.num_layers * (linear + attn))


def vae_flops_per_block(kind: str, frames_per_block: int, height: int, width: int) -> tuple[float, float] | None:
    """FLOPs of the streaming VAE decode of the first block and of a later one, counted by
    ``torch.utils.flop_counter`` on a meta-device copy of the VAE (no memory, no compute; convolutions only)."""
    from torch.utils.flop_counter import FlopCounterMode
    from diffusers import AutoencoderKLWan

    from reward_forcing.models.vae import TINY_VAE_ARCH

    try:
        with torch.device("meta"):
            vae = WanVAE(AutoencoderKLWan(**(TINY_VAE_ARCH if kind == "tiny" else WAN21_VAE_ARCH)))
        decoder = vae.stream_decoder()
        flops = []
        with torch.no_grad():
            for _ in range(2):
                latents = torch.zeros(1, frames_per_block, 16, height // 8, width // 8, device="meta")
                with FlopCounterMode(display=False) as counter:
                    decoder.decode(latents)
                flops.append(float(counter.get_total_flops()))
        return flops[0], flops[1]
    except Exception:  # noqa: BLE001 - an estimate only: never fail the benchmark over it
        return None


def block_key_frames(spec: CausalSpec, end_frame: int) -> int:
    """Frames attended by a call on the block ending at ``end_frame`` (sink + window, the block included)."""
    return end_frame if spec.local_attn_size == -1 else min(spec.local_attn_size, end_frame)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # read-only: never touch the index
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """The machine and software, from ``torch.utils.collect_env`` (what PyTorch bug reports use), plus the
    commit, the attention backend and the date."""
    from torch.utils.collect_env import get_env_info

    info = get_env_info()
    cpu = next((line.split(":", 1)[1].strip() for line in (info.cpu_info or "").splitlines()
                if line.startswith("Model name")), None) or platform.processor() or platform.machine()
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_memory_gb": None,
        "nvidia_driver": info.nvidia_driver_version,
        "os": info.os,
        "attention_backend": attention_backend_name(device, dtype),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / GB, 2)
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env["commit"] = commit
    env["dirty"] = bool(dirty) if dirty is not None and commit else None
    env["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return env


def summarise(args, runs: list[RunTiming], cold: RunTiming | None, text_s: float | None, pipe: StreamingPipeline,
              ) -> dict:
    steady = [b for r in runs for b in r.blocks if b.index >= args.warmup_blocks]
    steps = len(pipe.timesteps)
    frames_out = [b.frames for b in runs[0].blocks]
    steady_frames = _median([b.frames for b in steady])
    n_blocks = len(runs[0].blocks)
    dit_s, wall_s = _median([b.dit_s for b in steady]), _median([b.wall_s for b in steady])

    cfg = pipe.generator.config
    tokens = pipe.generator.tokens_per_frame(args.height // 8, args.width // 8)
    f = args.frames_per_block
    block_flops = [(steps + 1) * dit_flops_per_call(cfg, tokens, f, block_key_frames(args.spec, (i + 1) * f))
                   for i in range(n_blocks)]
    steady_flops = _median(block_flops[args.warmup_blocks:])
    vae_flops = vae_flops_per_block(args.vae, f, args.height, args.width)
    vae_steady = vae_flops[1] if vae_flops else None

    def per_run(r: RunTiming) -> dict:
        st = [b for b in r.blocks if b.index >= args.warmup_blocks]
        frames = sum(b.frames for b in st)
        return {"ttff_s": r.ttff_s, "total_s": r.total_s, "fps_dit": frames / sum(b.dit_s for b in st),
                "fps_dit_vae": frames / sum(b.wall_s for b in st)}

    total_s = _median([r.total_s for r in runs])
    video_frames = sum(frames_out)
    rec = {
        "ttff_s": _median([r.ttff_s for r in runs]),
        "ttff_cold_s": cold.ttff_s if cold is not None else None,
        "ttff_with_text_s": None,
        "fps_dit": steady_frames / dit_s,
        "fps_dit_vae": steady_frames / wall_s,
        "fps_with_text": None,
        "fps_end_to_end": None,
        "generation_s": total_s,
        "end_to_end_s": None,
        "text_encode_ms": None,
        "prepare_context_ms": 1e3 * _median([r.prepare_context_s for r in runs]),
        "denoise_ms": 1e3 * _median([b.denoise_s for b in steady]),
        "denoise_step_ms": 1e3 * _median([b.denoise_s for b in steady]) / steps,
        "context_ms": 1e3 * _median([b.context_s for b in steady]),
        "dit_ms": 1e3 * dit_s,
        "vae_ms": 1e3 * _median([b.vae_s for b in steady]),
        "block_ms": 1e3 * wall_s,
        "first_block_ms": 1e3 * _median([r.blocks[0].wall_s for r in runs]),
        "frames_per_block_out": frames_out,
        "steady_frames_per_block": steady_frames,
        "video_frames": video_frames,
        "generator_calls_per_block": runs[0].blocks[0].calls,
        "dit_tflop_per_block": steady_flops / 1e12,
        "dit_tflops_achieved": steady_flops / dit_s / 1e12,
        "vae_tflop_per_block": vae_steady / 1e12 if vae_steady else None,
        "vae_tflops_achieved": None,
    }
    vae_ms = rec["vae_ms"]
    if vae_steady and vae_ms:
        rec["vae_tflops_achieved"] = vae_steady / (vae_ms / 1e3) / 1e12
    if text_s is not None:
        rec["text_encode_ms"] = 1e3 * text_s
        rec["ttff_with_text_s"] = text_s + rec["ttff_s"]
        rec["fps_with_text"] = steady_frames / (wall_s + text_s / n_blocks)
        rec["end_to_end_s"] = text_s + total_s
    else:
        rec["end_to_end_s"] = total_s
    rec["fps_end_to_end"] = video_frames / rec["end_to_end_s"]
    rec["runs"] = [per_run(r) for r in runs]
    return rec


# --------------------------------------------------------------------------------------------- table
def format_table(rec: dict) -> str:
    def num(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = [
        f"reward-forcing streaming benchmark  ({rec['date']}, commit {rec['commit'] or '?'}"
        f"{' + local changes' if rec['dirty'] else ''})",
        f"  device      {rec['device_name']} [{rec['device']}]  torch {rec['torch']}  CUDA {rec['cuda'] or '-'}  "
        f"threads {rec['num_threads']}  load {num(rec['load_avg_1m'])}",
        f"  models      DiT {rec['flavor']}  VAE {rec['vae']}  text {rec['text_encoder']}"
        f"{' (offloaded)' if rec['offload_text_encoder'] else ''}  dtype {rec['dtype']}  attention "
        f"{rec['attention_backend']}  compile {rec['compile_status']}"
        f"{'  cudnn.benchmark' if rec['cudnn_benchmark'] else ''}",
        f"  video       {rec['width']}x{rec['height']}  {rec['latent_frames']} latent -> {rec['video_frames']} video "
        f"frames  block {rec['frames_per_block']}  window {rec['local_attn_size']}  sink {rec['sink_size']} "
        f"({rec['sink_policy']})  steps {len(rec['denoising_steps'])}",
        f"  runs        {rec['repeats']} timed (+{rec['warmup_runs']} warm-up), steady state = blocks >= "
        f"{rec['warmup_blocks']}; medians",
        "",
        f"  {'time to first frame':34s} {num(rec['ttff_s'], '{:.4f}')} s   "
        f"(cold run {num(rec['ttff_cold_s'], '{:.4f}')} s; "
        f"with text encoding {num(rec['ttff_with_text_s'], '{:.4f}')} s)",
        f"  {'steady FPS, DiT only':34s} {num(rec['fps_dit'])}",
        f"  {'steady FPS, DiT + VAE decode':34s} {num(rec['fps_dit_vae'])}",
        f"  {'steady FPS, + text enc. amortised':34s} {num(rec['fps_with_text'])}",
        f"  {'end to end':34s} {num(rec['end_to_end_s'], '{:.3f}')} s for {rec['video_frames']} frames = "
        f"{num(rec['fps_end_to_end'])} FPS",
        "",
        "  per block (steady state)           ms",
        f"    {'denoising steps':32s} {num(rec['denoise_ms'])}   ({num(rec['denoise_step_ms'])} per step)",
        f"    {'context (cache-write) pass':32s} {num(rec['context_ms'])}",
        f"    {'VAE decode':32s} {num(rec['vae_ms'])}",
        f"    {'whole block (wall)':32s} {num(rec['block_ms'])}",
        f"    {'first block (wall)':32s} {num(rec['first_block_ms'])}",
        f"  {'prepare_context (once)':34s} {num(rec['prepare_context_ms'])} ms",
        f"  {'text encoding (once)':34s} {num(rec['text_encode_ms'])} ms"
        f"{'' if rec['offload_ms'] is None else '; offload to CPU ' + num(rec['offload_ms']) + ' ms'}",
        f"  {'decoded frames per block':34s} {rec['frames_per_block_out']}",
        f"  {'DiT work per block':34s} {num(rec['dit_tflop_per_block'], '{:.3g}')} TFLOP -> "
        f"{num(rec['dit_tflops_achieved'], '{:.3g}')} TFLOP/s achieved",
        f"  {'VAE decode work per block':34s} {num(rec['vae_tflop_per_block'], '{:.3g}')} TFLOP -> "
        f"{num(rec['vae_tflops_achieved'], '{:.3g}')} TFLOP/s achieved",
        f"  {'peak memory (generation)':34s} {num(rec['peak_mem_gb'], '{:.3f}')} GB ({rec['peak_mem_kind']}); "
        f"process peak {num(rec['peak_mem_total_gb'], '{:.3f}')} GB",
        f"  {'compile':34s} {num(rec['compile_s'])} s ({rec['compile_cache'] or '-'} cache), "
        f"{rec['compile_graphs'] if rec['compile_graphs'] is not None else '-'} graphs, "
        f"{rec['compile_recompiles'] if rec['compile_recompiles'] is not None else '-'} recompiles after warm-up, "
        f"{rec['compile_fallbacks'] if rec['compile_fallbacks'] is not None else '-'} fallbacks",
        f"  {'weights':34s} DiT {num(rec['weights_gb']['generator'], '{:.3f}')}  VAE "
        f"{num(rec['weights_gb']['vae'], '{:.3f}')}  text {num(rec['weights_gb']['text_encoder'], '{:.3f}')} GB;"
        f"  KV cache {num(rec['kv_cache_gb'], '{:.3f}')} GB",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def run_benchmark(args) -> dict:
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # before we add our own
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    memory = PeakMemory(device)

    generator = build_generator(args.flavor, args.spec, device, dtype, args.seed)
    generator.rope.precision = getattr(torch, args.rope_precision)
    vae = build_vae(args.vae, device, dtype, args.seed)
    text_encoder = build_text_encoder(args.text_encoder, device, dtype, args.seed)
    text_dim = generator.config.text_dim
    if text_encoder is not None and text_encoder.dim != text_dim:
        raise BenchmarkError(f"--text_encoder {args.text_encoder} gives {text_encoder.dim}-dim embeddings but the "
                             f"{args.flavor} DiT takes {text_dim}: use tiny with the tiny flavor, umt5-xxl otherwise")
    schedule = args.cfg.schedule
    pipe = StreamingPipeline(generator, text_encoder, vae, StreamSettings(
        denoising_steps=tuple(schedule.denoising_step_list), warp=schedule.warp_denoising_step,
        timestep_shift=schedule.timestep_shift, context_noise=schedule.context_noise,
        context_pass=schedule.context_pass, offload_text_encoder=args.offload_text_encoder, height=args.height,
        width=args.width))
    weights = {"generator": _param_bytes(generator) / GB, "vae": _param_bytes(vae) / GB,
               "text_encoder": _param_bytes(text_encoder) / GB}
    clock = Clock(device)

    # Prompt encoding is timed on its own (the targets count time to first frame after it).
    text_s, peak_text, offload_s = None, None, None
    if text_encoder is not None:
        memory.reset()
        text_s, context = time_text_encoding(pipe, args.prompt, clock, args.repeats, warmup=1)
        peak_text = memory.peak_bytes() / GB
        if args.offload_text_encoder:
            t0 = clock.sync()
            text_encoder.to("cpu")  # encode_prompts already parked it; this times a lone move for reference
            offload_s = clock.sync() - t0
    else:  # a random stand-in for the text-encoder output [1, 512, text_dim]
        context = torch.randn((1, 512, text_dim), generator=torch.Generator().manual_seed(args.seed))
        context = context.to(device=device, dtype=dtype)
    memory.reset()  # the generation phase starts here (text encoder already offloaded if asked)

    if args.compile:
        if args.compile_cache_dir:
            set_compile_cache_dir(args.compile_cache_dir)
        generator.compile_blocks(args.compile_mode, fallback=args.compile_fallback)
    kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, seed=args.seed)
    counters = CompileCounters.read()
    cold = None
    for _ in range(args.warmup_runs):
        run = timed_stream(pipe, context, clock, **kw)
        cold = cold or run
    after_warmup = CompileCounters.read()
    runs = [timed_stream(pipe, context, clock, **kw) for _ in range(args.repeats)]
    compiled = compile_fields(args, generator, cold, runs, after_warmup - counters,
                              CompileCounters.read() - after_warmup)

    peak = memory.peak_bytes() / GB
    rec = {
        "schema": SCHEMA,
        "config_path": args.config_path, "overrides": list(args.overrides),
        "flavor": args.flavor, "vae": args.vae, "text_encoder": args.text_encoder,
        "offload_text_encoder": args.offload_text_encoder,
        **environment(device, dtype),
        "load_avg_1m": load,
        "compile": bool(args.compile), **compiled, "rope_precision": args.rope_precision,
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "dtype": str(dtype).replace("torch.", ""),
        "height": args.height, "width": args.width,
        "latent_frames": args.num_frames, "frames_per_block": args.frames_per_block,
        "local_attn_size": args.local_attn_size, "sink_size": args.spec.sink_frames,
        "sink_policy": args.sink_policy, "denoising_steps": [round(t, 4) for t in pipe.timesteps],
        "repeats": args.repeats, "warmup_runs": args.warmup_runs, "warmup_blocks": args.warmup_blocks,
        **summarise(args, runs, cold, text_s, pipe),
        "peak_mem_gb": peak,
        "peak_mem_total_gb": memory.process_peak_bytes() / GB,
        "peak_mem_text_gb": peak_text,
        "offload_ms": None if offload_s is None else 1e3 * offload_s,
        "peak_mem_kind": memory.kind,
        "weights_gb": weights,
        "kv_cache_gb": pipe.generator.new_kv_cache(1, *pipe.latent_size(args.height, args.width),
                                                   max_frames=args.num_frames, device="meta").nbytes / GB,
    }
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rec = run_benchmark(args)
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
