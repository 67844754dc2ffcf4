"""What a benchmark run measures: the command line's choices resolved against a config (``--config_path``, or the
schema defaults with the tiny flavor) into the one config ``build.py`` builds from, with random weights and every
choice applied as a ``key=value`` override, so the benchmark builds exactly what that config would."""
from __future__ import annotations

import argparse

from ..config import Config, load_config

DEFAULT_PROMPT = "A red fox trots through fresh snow in a quiet pine forest at dawn, soft golden light."
# model.text_encoder with --text_encoder none: a stand-in the runner builds on the meta device and drops (the
# pipeline then runs without a text encoder, on a random context tensor).
NO_TEXT_ENCODER_STAND_IN = "tiny"


def resolve_settings(args: argparse.Namespace) -> None:
    """Fill every unset flag from the config and check the combination; sets ``args.cfg`` (the config the models
    are built from: the user's overrides, then the flags) and ``args.spec`` (its causal spec). Raises
    ``ConfigError`` / ``FileNotFoundError`` / ``ValueError`` with a one-line message."""
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
    args.cfg = benchmark_config(args)
    args.spec = args.cfg.causal


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The resolved flags as config overrides: random weights, models, cache, video size, RoPE, compile."""
    text_encoder = NO_TEXT_ENCODER_STAND_IN if args.text_encoder == "none" else args.text_encoder

    def flag(value: bool) -> str:
        return "true" if value else "false"

    return ["model.random_init=true", f"model.generator={args.flavor}", f"model.vae={args.vae}",
            f"model.text_encoder={text_encoder}", f"text.offload_text_encoder={flag(args.offload_text_encoder)}",
            f"model.rope_precision={args.rope_precision}", f"model.compile={flag(args.compile)}",
            f"model.compile_mode={args.compile_mode}", f"model.compile_fallback={args.compile_fallback}",
            f"video.height={args.height}", f"video.width={args.width}", f"video.num_output_frames={args.num_frames}",
            f"causal.frames_per_block={args.frames_per_block}", f"causal.local_attn_size={args.local_attn_size}",
            f"causal.sink_size={args.sink_size}", f"causal.sink_policy={args.sink_policy}"]


def benchmark_config(args: argparse.Namespace) -> Config:
    """The config the benchmarked models are built from: ``--config_path``, the user's overrides, then the flags;
    random weights, so the weight files a config names (``model.checkpoint``, ``model.lora``) are not read."""
    cfg = load_config(args.config_path, [*args.overrides, *config_overrides(args)])
    cfg.model.checkpoint = cfg.model.lora = ""
    return cfg
