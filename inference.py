"""Generate videos from a prompt file with a streaming Reward Forcing student.

    python inference.py --config_path configs/reward_forcing.yaml \
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt \
        --data_path prompts/MovieGenVideoBench_extended.txt --output_folder videos/rf --use_ema

    python inference.py --config_path configs/tiny.yaml --data_path prompts/example.txt   # CPU, random weights

Flags follow the reference's inference.py. Each prompt (and sample) becomes ``{index:04d}-{slug}-s{sample}.mp4``,
written frame by frame while it streams. Under ``torchrun`` the prompts are split across ranks (none dropped).
Extra ``key=value`` arguments override the config (e.g. ``causal.sink_policy=static``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from reward_forcing import checkpoints as ckpt
from reward_forcing.config import ConfigError, load_config
from reward_forcing.data import read_prompts, shard_for_rank
from reward_forcing.pipeline import StreamingPipeline
from reward_forcing.video_io import Mp4Writer, video_filename

log = logging.getLogger("inference")


class SetupError(Exception):
    """A problem with the command line, files or hardware, reported without a traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Stream text-to-video with a Reward Forcing student: one mp4 per prompt and sample.",
        epilog="Extra key=value arguments override the config, e.g. causal.sink_policy=static video.height=480. "
               "Tiny random weights (configs/tiny.yaml) make noise, not video: fetch the released weights with "
               "`bash download_checkpoints.sh` and use configs/reward_forcing.yaml.")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml", help="YAML config (see configs/)")
    p.add_argument("--checkpoint_path", default=None,
                   help="generator weights: the released rewardforcing.pt, a trainer checkpoint "
                        "({generator, critic, generator_ema}), ode_init.pt or .safetensors. Default: "
                        f"<checkpoint_root>/{ckpt.RELEASED_GENERATOR}, or random weights if the config says "
                        "model.random_init")
    p.add_argument("--data_path", required=True, help="prompt file, one prompt per line")
    p.add_argument("--extended_prompt_path", default=None,
                   help="optional file with an extended (LLM-rewritten) prompt per line, same line count; the "
                        "extended text conditions the model, the original names the file")
    p.add_argument("--output_folder", default="videos", help="where the mp4 files go (created if needed)")
    p.add_argument("--num_output_frames", type=int, default=None,
                   help="LATENT frames to generate, a multiple of the block size: 21 -> 81 video frames (5 s), "
                        "120 -> 477 (30 s). Default: video.num_output_frames of the config")
    p.add_argument("--use_ema", action="store_true", help="use generator_ema of a trainer checkpoint")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i, sample s uses seed + i * num_samples + s")
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload_text_encoder", action="store_true",
                   help="park UMT5 on the CPU and move it to the GPU only to encode each prompt (saves ~11 GB "
                        "of GPU memory between prompts, for 16 GB cards)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator's blocks (first video slower; errors fall back to eager)")
    p.add_argument("--save_with_index", action="store_true", help=argparse.SUPPRESS)  # reference flag; names
    # always carry the prompt index here
    p.add_argument("--i2v", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name} was requested but no CUDA GPU is available (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_output_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SetupError(f"cannot write to --output_folder {folder}: {err.strerror or err}") from None


def setup(args):
    """Everything that can fail because of user input, before any video is generated."""
    if args.i2v:
        raise SetupError("--i2v is not supported: this implementation is text-to-video only")
    if args.num_samples < 1:
        raise SetupError(f"--num_samples must be >= 1, got {args.num_samples}")
    overrides = list(args.overrides)
    if args.num_output_frames is not None:
        overrides.append(f"video.num_output_frames={args.num_output_frames}")
    if args.offload_text_encoder:
        overrides.append("text.offload_text_encoder=true")
    if args.compile:
        overrides.append("model.compile=true")
    cfg = load_config(args.config_path, overrides)
    prompts = read_prompts(args.data_path, args.extended_prompt_path)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    dtype = resolve_dtype(args.dtype, device)
    output = Path(args.output_folder)
    check_output_folder(output)

    checkpoint = args.checkpoint_path
    if checkpoint is None and not cfg.model.random_init:
        checkpoint = ckpt.asset_path(cfg.checkpoint_root, "released_generator", must_exist=False)
        if not checkpoint.is_file():
            raise SetupError(f"no --checkpoint_path given and the released generator {checkpoint} is missing; "
                             "run `bash download_checkpoints.sh` (or pass --checkpoint_path)")
    if checkpoint is not None:
        ckpt.require_file(checkpoint, "generator checkpoint (--checkpoint_path)")
        if not cfg.model.random_init:
            ckpt.resolve_checkpoint_root(cfg.checkpoint_root)
    pipe = StreamingPipeline.from_config(cfg, checkpoint=checkpoint, use_ema=args.use_ema, device=device,
                                         dtype=dtype)
    return cfg, shard_for_rank(prompts, rank, world), pipe, output, rank


def generate_all(args, cfg, prompts, pipe: StreamingPipeline, output: Path, rank: int) -> list[Path]:
    frames_per_video = 1 + 4 * (cfg.video.num_output_frames - 1)
    written = []
    for prompt in prompts:
        for sample in range(args.num_samples):
            path = output / video_filename(prompt.index, prompt.text, sample)
            seed = args.seed + prompt.index * args.num_samples + sample
            bar = tqdm(total=frames_per_video, unit="frame", desc=f"[{rank}] {path.name}", leave=False,
                       disable=rank != 0)
            with Mp4Writer(path, fps=cfg.video.fps) as writer:
                for chunk in pipe.stream(prompt.conditioning, num_frames=cfg.video.num_output_frames,
                                         height=cfg.video.height, width=cfg.video.width, seed=seed):
                    writer.write(chunk.frames[0])
                    bar.update(chunk.frames.shape[1])
            bar.close()
            log.info("wrote %s (%d frames)", path, frames_per_video)
            written.append(path)
    return written


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        cfg, prompts, pipe, output, rank = setup(args)
    except (SetupError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.model.random_init:
        log.warning("random tiny weights: the videos will be noise. Real weights: bash download_checkpoints.sh "
                    "and --config_path configs/reward_forcing.yaml")
    with torch.inference_mode():
        written = generate_all(args, cfg, prompts, pipe, output, rank)
    log.info("done: %d video(s) in %s", len(written), output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
