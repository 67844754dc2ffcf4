"""Generate videos from a prompt file with a streaming Reward Forcing student.

    python inference.py --config_path configs/reward_forcing.yaml \
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt \
        --data_path prompts/MovieGenVideoBench_extended.txt --output_folder videos/rf --use_ema

    python inference.py --config_path configs/tiny.yaml --data_path prompts/example.txt   # CPU, random weights

Flags follow the reference's inference.py. Each prompt (and sample) becomes ``{index:04d}-{slug}-s{sample}.mp4``,
written frame by frame while it streams. Under ``torchrun`` the prompts are split across ranks (none dropped);
with ``--pipeline_parallel`` the model's layers are split instead, every rank streams every prompt through its
stage and rank 0 writes the videos (docs/multi_gpu.md):

    torchrun --nproc_per_node 2 inference.py --config_path configs/reward_forcing.yaml --data_path p.txt --pipeline_parallel

Extra ``key=value`` arguments override the config (e.g. ``causal.sink_policy=static``).

Bad input ends in one line on stderr (exit 2) before the output folder is created. SIGTERM is handled like
Ctrl-C: the video being written is deleted, finished ones are kept, and no temporary file is left behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from reward_forcing import checkpoints as ckpt
from reward_forcing import file_io
from reward_forcing.build import build_pipeline, needs_checkpoint_root, resolve_device, resolve_dtype
from reward_forcing.compile import COMPILE_MODES
from reward_forcing.config import ConfigError, load_config
from reward_forcing.data import read_prompts, shard_for_rank
from reward_forcing.pipeline import StreamingPipeline
from reward_forcing.pipeline_parallel import init_from_env
from reward_forcing.video_io import Mp4Writer, video_filename

log = logging.getLogger("inference")


class SetupError(Exception):
    """A problem with the command line, files or hardware, reported without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, torchrun tearing down), raised where Ctrl-C would raise."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage first; one line says what to fix
        raise SetupError(f"{message} (see --help)")


def _int_in(low: int, high: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"must be {bound} ({what}), got {value}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        description="Stream text-to-video with a Reward Forcing student: one mp4 per prompt and sample.",
        epilog="Extra key=value arguments override the config, e.g. causal.sink_policy=static video.height=480. "
               "Tiny random weights (configs/tiny.yaml) make noise, not video: fetch the released weights with "
               "`bash download_checkpoints.sh` and use configs/reward_forcing.yaml.")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml", help="YAML config (see configs/)")
    p.add_argument("--checkpoint_path", default=None,
                   help="generator weights: the released rewardforcing.pt, a trainer checkpoint "
                        "({generator, critic, generator_ema}), ode_init.pt or .safetensors. Default: the config's "
                        f"model.checkpoint, else <checkpoint_root>/{ckpt.RELEASED_GENERATOR}, or random weights if "
                        "the config says model.random_init")
    p.add_argument("--data_path", required=True, help="prompt file, one prompt per line")
    p.add_argument("--extended_prompt_path", default=None,
                   help="optional file with an extended (LLM-rewritten) prompt per line, same line count; the "
                        "extended text conditions the model, the original names the file")
    p.add_argument("--output_folder", default="videos", help="where the mp4 files go (created if needed)")
    p.add_argument("--num_output_frames", default=None,
                   type=_int_in(1, None, "latent frames, a multiple of causal.frames_per_block, e.g. 21"),
                   help="LATENT frames to generate, a multiple of the block size: 21 -> 81 video frames (5 s), "
                        "120 -> 477 (30 s). Default: video.num_output_frames of the config")
    p.add_argument("--use_ema", action="store_true", help="use generator_ema of a trainer checkpoint")
    p.add_argument("--seed", type=_int_in(0, 2**63, "a torch seed"), default=0,
                   help="base seed; prompt i, sample s uses seed + i * num_samples + s")
    p.add_argument("--num_samples", type=_int_in(1, None, "videos per prompt"), default=1,
                   help="videos per prompt")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload_text_encoder", action="store_true",
                   help="park UMT5 on the CPU and move it to the GPU only to encode each prompt (saves ~11 GB "
                        "of GPU memory between prompts, for 16 GB cards)")
    p.add_argument("--quantize", default=None, choices=["none", "int8", "fp8"],
                   help="quantize the weights of the generator's transformer layers (optimum-quanto, the [quant] "
                        "extra): int8 or fp8, on CPUs and GPUs. Default: the config's model.quantize (none). Memory "
                        "per card: docs/memory.md")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generator's blocks (first video slower; later processes load the "
                        "compiled code from inductor's cache, $TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode with --compile; max-autotune and reduce-overhead use CUDA graphs. "
                        "Default: model.compile_mode of the config. A failed compile stops the run unless "
                        "model.compile_fallback=eager")
    p.add_argument("--pipeline_parallel", action="store_true",
                   help="under torchrun: split the generator's layers across the N ranks (each holds 1/N of the "
                        "layers and of the KV cache; rank 0 writes) instead of giving each rank its own prompts. "
                        "Saves memory, not time, for one stream: docs/multi_gpu.md (model.pipeline_parallel)")
    p.add_argument("--save_with_index", action="store_true", help=argparse.SUPPRESS)  # reference flag; names
    # always carry the prompt index here
    p.add_argument("--i2v", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timeline", default=None,
                   help="JSON list of events at block indices (prompt switches with a policy, seeds, resets, "
                        "sink alpha), applied to every video; see docs/interactive.md")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--image", default=None,
                       help="start every video from this image (written into the cache as the first block; "
                            "not part of the output); resized / center-cropped to the video size")
    start.add_argument("--extend", default=None,
                       help="continue this video (mp4): it fills the cache, the output is the continuation")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def check_output_folder(folder: Path) -> None:
    """Fail now if ``folder`` could not be created or written later; creates nothing."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"cannot write to --output_folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"cannot write to --output_folder {folder}: no write permission in {existing}")


def prepare_output_folder(folder: Path, names: set[str]) -> None:
    """Create ``folder`` and clear what a killed run left there (SIGKILL, power cut: nothing could clean up).

    Unfinished videos under the names this run writes are deleted; others are only reported, since another run
    (or another torchrun rank) may still be writing them.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SetupError(f"cannot create --output_folder {folder}: {err.strerror or err}") from None
    others = []
    for tmp, target in file_io.leftover_temps(folder).items():
        if target in names:
            tmp.unlink(missing_ok=True)
            log.warning("removed %s, an unfinished video left by an interrupted run", tmp)
        else:
            others.append(tmp)
    if others:
        log.warning("%s holds %d unfinished file(s) of another run, or of one that was killed (e.g. %s); delete "
                    "them if no other run is writing there", folder, len(others), others[0].name)


def setup(args):
    """Everything that can fail because of user input, before any video is generated."""
    if args.i2v:
        raise SetupError("--i2v is not supported: this implementation is text-to-video only")
    overrides = list(args.overrides)
    if args.num_output_frames is not None:
        overrides.append(f"video.num_output_frames={args.num_output_frames}")
    if args.offload_text_encoder:
        overrides.append("text.offload_text_encoder=true")
    if args.quantize is not None:
        overrides.append(f"model.quantize={args.quantize}")
    if args.compile:
        overrides.append("model.compile=true")
    if args.pipeline_parallel:
        overrides.append("model.pipeline_parallel=true")
    if args.compile_mode is not None:
        overrides.append(f"model.compile_mode={args.compile_mode}")
    cfg = load_config(args.config_path, overrides)
    prompts = read_prompts(args.data_path, args.extended_prompt_path)
    args.events, args.start_media = _interactive_inputs(args, cfg)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    dtype = resolve_dtype(args.dtype, device)
    output = Path(args.output_folder)
    check_output_folder(output)
    args.writes = True
    if cfg.model.pipeline_parallel and world > 1:  # the stages talk through the process group
        init_from_env(device)
        args.writes = rank == 0
    elif cfg.model.pipeline_parallel:
        log.warning("--pipeline_parallel without torchrun: one process holds the whole model (run it under "
                    "torchrun --nproc_per_node N to split the layers across N GPUs)")

    checkpoint = args.checkpoint_path or cfg.model.checkpoint or None
    if checkpoint is None and not cfg.model.random_init:
        checkpoint = ckpt.asset_path(cfg.checkpoint_root, "released_generator", must_exist=False)
        if not checkpoint.is_file():
            raise SetupError(f"no --checkpoint_path given and the released generator {checkpoint} is missing; "
                             "run `bash download_checkpoints.sh` (or pass --checkpoint_path)")
    if checkpoint is not None:
        ckpt.require_file(checkpoint, "generator checkpoint (--checkpoint_path)")
        if not cfg.model.random_init and needs_checkpoint_root(cfg):
            ckpt.resolve_checkpoint_root(cfg.checkpoint_root)
    pipe = build_pipeline(cfg, checkpoint=checkpoint, use_ema=args.use_ema, device=device, dtype=dtype)
    if not cfg.model.pipeline_parallel:
        prompts = shard_for_rank(prompts, rank, world)
    names = {video_filename(p.index, p.text, sample) for p in prompts for sample in range(args.num_samples)}
    if args.writes:
        prepare_output_folder(output, names)
    return cfg, prompts, pipe, output, rank


def generate_all(args, cfg, prompts, pipe: StreamingPipeline, output: Path, rank: int) -> list[Path]:
    frames_per_video = pipe.vae.video_frames(cfg.video.num_output_frames)
    written = []
    for prompt in prompts:
        for sample in range(args.num_samples):
            path = output / video_filename(prompt.index, prompt.text, sample)
            seed = args.seed + prompt.index * args.num_samples + sample
            if not args.writes:  # a later pipeline stage: stream through its layers; rank 0 decodes and writes
                for _ in _chunks(args, cfg, pipe, prompt.conditioning, seed, decode=False):
                    pass
                continue
            bar = tqdm(total=frames_per_video, unit="frame", desc=f"[{rank}] {path.name}", leave=False,
                       disable=rank != 0)
            with Mp4Writer(path, fps=cfg.video.fps, scale=cfg.video.display_scale) as writer:
                for chunk in _chunks(args, cfg, pipe, prompt.conditioning, seed):
                    writer.write(chunk.frames[0])
                    bar.update(chunk.frames.shape[1])
            bar.close()
            log.info("wrote %s (%d frames)", path, bar.n)
            written.append(path)
    return written


def _interactive_inputs(args, cfg):
    """The --timeline events and the --image / --extend pixels, read and checked before anything is written."""
    from reward_forcing.interactive import fit_frames, load_timeline, read_image
    from reward_forcing.video_io import read_video

    events = load_timeline(args.timeline) if args.timeline else None
    if (args.timeline or args.image or args.extend) and cfg.video.num_output_frames % cfg.causal.frames_per_block:
        raise SetupError(f"--num_output_frames {cfg.video.num_output_frames} must be a multiple of the "
                         f"{cfg.causal.frames_per_block}-frame block")
    media = None
    if args.image or args.extend:
        frames = read_image(args.image)[None] if args.image else read_video(args.extend)[0]
        pixels, note = fit_frames(frames, cfg.video.height, cfg.video.width)
        if note:
            log.info("%s: %s", args.image or args.extend, note)
        media = {"image": pixels[0]} if args.image else {"video": pixels}
    return events, media


def _chunks(args, cfg, pipe: StreamingPipeline, prompt: str, seed: int, decode: bool = True):
    """The blocks of one video: ``pipe.stream`` for plain text-to-video, a live Session to follow a timeline or
    start from an image / video."""
    if args.events is None and args.start_media is None:
        yield from pipe.stream(prompt, num_frames=cfg.video.num_output_frames, height=cfg.video.height,
                               width=cfg.video.width, seed=seed, decode=decode)
        return
    from reward_forcing.interactive import Session

    session = Session(pipe, prompt, seed=seed, height=cfg.video.height, width=cfg.video.width,
                      events=args.events or (), decode=decode, **(args.start_media or {}))
    yield from session.blocks(cfg.video.num_output_frames // pipe.frames_per_block)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    restore_sigterm = _sigterm_like_ctrl_c()
    try:
        return _run(argv)
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{how}: the unfinished video was deleted; finished videos are kept", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        restore_sigterm()


def _run(argv) -> int:
    try:
        args = parse_args(argv)
        cfg, prompts, pipe, output, rank = setup(args)
    except (SetupError, ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.model.random_init:
        log.warning("random tiny weights: the videos will be noise. Real weights: bash download_checkpoints.sh "
                    "and --config_path configs/reward_forcing.yaml")
    try:
        with torch.inference_mode():
            written = generate_all(args, cfg, prompts, pipe, output, rank)
    except OSError as err:  # e.g. a full disk: the writer has already deleted its unfinished file
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():  # pipeline stages
            torch.distributed.destroy_process_group()
    if args.writes:
        log.info("done: %d video(s) in %s", len(written), output)
    else:
        log.info("done: pipeline stage %d streamed every video; rank 0 wrote them", rank)
    return 0


def _sigterm_like_ctrl_c():
    """Make SIGTERM raise ``Terminated`` (a KeyboardInterrupt), so the same unwinding deletes the unfinished video;
    returns a function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
