"""The benchmark's record and table: the machine and software it ran on, the figures summarised from the timed
runs (medians over steady-state blocks), the compile figures, and the readable table printed on stderr."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..compile import CompileCounters, compile_cache_dir
from ..models.attention import attention_backend_name
from ..models.wan import WanModel
from ..pipeline import StreamingPipeline
from .flops import block_key_frames, dit_flops_per_call, vae_flops_per_block
from .timing import RunTiming, median

SCHEMA = "reward-forcing-benchmark/1"
GB = 1e9  # memory figures are in GB = 10^9 bytes
REPO_ROOT = Path(__file__).resolve().parents[2]


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


def compile_fields(model_cfg, generator: WanModel, cold: RunTiming | None, runs: list[RunTiming],
                   warmup: CompileCounters, timed: CompileCounters) -> dict:
    """The record's compile figures (``model_cfg``: the config's ``model`` section). ``compile_s`` is the warm-up
    run's wall time beyond a timed run's: what compiling cost this process, cold (nothing in inductor's cache) or
    warm (everything loaded from it), as ``compile_cache`` says; ``compile_recompiles`` counts graphs compiled
    during the timed runs (0: the warm-up covered every shape)."""
    if not model_cfg.compile:
        return {"compile_status": "off", **dict.fromkeys(
            ["compile_mode", "compile_fallback", "compile_s", "compile_cold_s", "compile_warm_s", "compile_cache",
             "compile_cache_dir", "compile_graphs", "compile_graph_breaks", "compile_recompiles",
             "compile_fallbacks"])}
    failures = generator.compile_failures
    compile_s = cold.total_s - median([r.total_s for r in runs]) if cold is not None else None
    state = warmup.cache_state
    return {
        "compile_status": f"eager fallback ({failures[0]})" if failures else f"on ({model_cfg.compile_mode})",
        "compile_mode": model_cfg.compile_mode, "compile_fallback": model_cfg.compile_fallback,
        "compile_s": compile_s,
        "compile_cold_s": compile_s if state == "cold" else None,
        "compile_warm_s": compile_s if state == "warm" else None,
        "compile_cache": state, "compile_cache_dir": str(compile_cache_dir()),
        "compile_graphs": warmup.graphs, "compile_graph_breaks": warmup.graph_breaks + timed.graph_breaks,
        "compile_recompiles": timed.graphs, "compile_fallbacks": len(failures),
    }


def summarise(runs: list[RunTiming], cold: RunTiming | None, text_s: float | None, pipe: StreamingPipeline, *,
              warmup_blocks: int, height: int, width: int) -> dict:
    """The record's timing and work figures: medians over the steady-state blocks (index >= ``warmup_blocks``)
    of all timed runs, TTFF over runs; ``text_s`` (None without a text encoder) adds the with-text figures."""
    steady = [b for r in runs for b in r.blocks if b.index >= warmup_blocks]
    steps = len(pipe.timesteps)
    frames_out = [b.frames for b in runs[0].blocks]
    steady_frames = median([b.frames for b in steady])
    n_blocks = len(runs[0].blocks)
    dit_s, wall_s = median([b.dit_s for b in steady]), median([b.wall_s for b in steady])

    tokens = pipe.generator.tokens_per_frame(*pipe.latent_size(height, width))
    f = pipe.frames_per_block
    spec = pipe.generator.causal
    block_flops = [(steps + 1) * dit_flops_per_call(pipe.generator.config, tokens, f,
                                                    block_key_frames(spec, (i + 1) * f)) for i in range(n_blocks)]
    steady_flops = median(block_flops[warmup_blocks:])
    vae_flops = vae_flops_per_block(pipe.vae, f, height, width)
    vae_steady = vae_flops[1] if vae_flops else None

    def per_run(r: RunTiming) -> dict:
        st = [b for b in r.blocks if b.index >= warmup_blocks]
        frames = sum(b.frames for b in st)
        return {"ttff_s": r.ttff_s, "total_s": r.total_s, "fps_dit": frames / sum(b.dit_s for b in st),
                "fps_dit_vae": frames / sum(b.wall_s for b in st)}

    total_s = median([r.total_s for r in runs])
    video_frames = sum(frames_out)
    rec = {
        "ttff_s": median([r.ttff_s for r in runs]),
        "ttff_cold_s": cold.ttff_s if cold is not None else None,
        "ttff_with_text_s": None,
        "fps_dit": steady_frames / dit_s,
        "fps_dit_vae": steady_frames / wall_s,
        "fps_with_text": None,
        "fps_end_to_end": None,
        "generation_s": total_s,
        "end_to_end_s": None,
        "text_encode_ms": None,
        "prepare_context_ms": 1e3 * median([r.prepare_context_s for r in runs]),
        "denoise_ms": 1e3 * median([b.denoise_s for b in steady]),
        "denoise_step_ms": 1e3 * median([b.denoise_s for b in steady]) / steps,
        "context_ms": 1e3 * median([b.context_s for b in steady]),
        "dit_ms": 1e3 * dit_s,
        "vae_ms": 1e3 * median([b.vae_s for b in steady]),
        "block_ms": 1e3 * wall_s,
        "first_block_ms": 1e3 * median([r.blocks[0].wall_s for r in runs]),
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


def format_table(rec: dict) -> str:
    """The record as the readable table the command line prints on stderr."""
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
