"""The benchmark run: build the pipeline of the resolved config through ``build.py`` (random weights on the
target device), time prompt encoding on its own, then one or more untimed warm-up streams and the timed ones, and
assemble the JSON record (docs/benchmarks.md says what each field includes)."""
from __future__ import annotations

import argparse
import os

import torch

from ..build import build_pipeline, resolve_device, resolve_dtype
from ..compile import CompileCounters, set_compile_cache_dir
from ..config import Config
from ..pipeline import StreamingPipeline
from .memory import PeakMemory, weight_bytes
from .report import GB, SCHEMA, compile_fields, environment, summarise
from .timing import Clock, time_text_encoding, timed_stream


class BenchmarkError(Exception):
    """A bad combination of options, reported without a traceback."""


def benchmark_device(name: str) -> torch.device:
    """``--device`` through the one resolver; on CUDA an explicit index, made current (events and peak-memory
    counters are per device)."""
    try:
        device = resolve_device(name)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise BenchmarkError(f"--device {name}: the benchmark times cpu and cuda only")
    return device


def build_benchmark_pipeline(cfg: Config, *, text_encoder: bool, device: torch.device, dtype: torch.dtype
                             ) -> StreamingPipeline:
    """``build.build_pipeline`` of the resolved config (``model.random_init``: real-size models are allocated and
    filled on ``device``). The text encoder is built on ``device`` too (with ``text.offload_text_encoder`` the
    pipeline parks it on the CPU after each encode); without one (``text_encoder=False``) the config's stand-in
    is built on the meta device and dropped."""
    pipe = build_pipeline(cfg, device=device, dtype=dtype, text_encoder_device=device if text_encoder else "meta")
    if not text_encoder:
        pipe.text_encoder = None
    return pipe


def run_streaming_benchmark(args: argparse.Namespace) -> dict:
    """Benchmark the streaming pipeline of ``args`` (resolved by ``settings.resolve_settings``): the JSON record."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # before we add our own
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = benchmark_device(args.device)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None
    memory = PeakMemory(device)
    cfg = args.cfg
    if cfg.model.compile and args.compile_cache_dir:
        set_compile_cache_dir(args.compile_cache_dir)  # before anything compiles (compile_layers is lazy)

    pipe = build_benchmark_pipeline(cfg, text_encoder=args.text_encoder != "none", device=device, dtype=dtype)
    generator, text_encoder = pipe.generator, pipe.text_encoder
    text_dim = generator.config.text_dim
    if text_encoder is not None and text_encoder.dim != text_dim:
        raise BenchmarkError(f"--text_encoder {args.text_encoder} gives {text_encoder.dim}-dim embeddings but the "
                             f"{args.flavor} DiT takes {text_dim}: use tiny with the tiny flavor, umt5-xxl otherwise")
    weights = {"generator": weight_bytes(generator) / GB, "vae": weight_bytes(pipe.vae) / GB,
               "text_encoder": weight_bytes(text_encoder) / GB}
    clock = Clock(device)

    # Prompt encoding is timed on its own (the targets count time to first frame after it).
    text_s, peak_text, offload_s = None, None, None
    if text_encoder is not None:
        memory.reset()
        text_s, context = time_text_encoding(pipe, args.prompt, clock, args.repeats, warmup=1)
        peak_text = memory.peak_bytes() / GB
        if cfg.text.offload_text_encoder:
            t0 = clock.sync()
            text_encoder.to("cpu")  # encode_prompts already parked it; this times a lone move for reference
            offload_s = clock.sync() - t0
    else:  # a random stand-in for the text-encoder output [1, text_len (512), text_dim]
        context = torch.randn((1, generator.config.text_len, text_dim),
                              generator=torch.Generator().manual_seed(args.seed))
        context = context.to(device=device, dtype=dtype)
    memory.reset()  # the generation phase starts here (text encoder already offloaded if asked)

    kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, seed=args.seed)
    counters = CompileCounters.read()
    cold = None
    for _ in range(args.warmup_runs):
        run = timed_stream(pipe, context, clock, **kw)
        cold = cold or run
    after_warmup = CompileCounters.read()
    runs = [timed_stream(pipe, context, clock, **kw) for _ in range(args.repeats)]
    compiled = compile_fields(cfg.model, generator, cold, runs, after_warmup - counters,
                              CompileCounters.read() - after_warmup)

    peak = memory.peak_bytes() / GB
    spec = generator.causal
    return {
        "schema": SCHEMA,
        "config_path": args.config_path, "overrides": list(args.overrides),
        "flavor": args.flavor, "vae": args.vae, "text_encoder": args.text_encoder,
        "offload_text_encoder": cfg.text.offload_text_encoder,
        **environment(device, dtype),
        "load_avg_1m": load,
        "compile": cfg.model.compile, **compiled, "rope_precision": cfg.model.rope_precision,
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "dtype": str(dtype).replace("torch.", ""),
        "height": args.height, "width": args.width,
        "latent_frames": args.num_frames, "frames_per_block": spec.frames_per_block,
        "local_attn_size": spec.local_attn_size, "sink_size": spec.sink_frames,
        "sink_policy": spec.sink_policy, "denoising_steps": [round(t, 4) for t in pipe.timesteps],
        "repeats": args.repeats, "warmup_runs": args.warmup_runs, "warmup_blocks": args.warmup_blocks,
        **summarise(runs, cold, text_s, pipe, warmup_blocks=args.warmup_blocks, height=args.height,
                    width=args.width),
        "peak_mem_gb": peak,
        "peak_mem_total_gb": memory.process_peak_bytes() / GB,
        "peak_mem_text_gb": peak_text,
        "offload_ms": None if offload_s is None else 1e3 * offload_s,
        "peak_mem_kind": memory.kind,
        "weights_gb": weights,
        "kv_cache_gb": generator.new_kv_cache(1, *pipe.latent_size(args.height, args.width),
                                              max_frames=args.num_frames, device="meta").nbytes / GB,
    }
