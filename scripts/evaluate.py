#!/usr/bin/env python
"""Score generated videos, compare runs, or run a published evaluation protocol end to end.

    # score a folder of mp4s (our names + the prompt file, or any names): records, summary, report.html
    python scripts/evaluate.py videos/rf --prompts prompts/MovieGenVideoBench.txt \
        --extended_prompts prompts/MovieGenVideoBench_extended.txt

    # side by side: EMA sink vs static sink vs none on the same prompts and seeds
    python scripts/evaluate.py --compare videos/ema videos/static videos/none --output_dir compare/sinks

    # the paper's 5-second VBench protocol: generate with inference.py (8 GPUs), then score
    python scripts/evaluate.py --protocol configs/eval/vbench_5s.yaml --nproc_per_node 8 \
        --checkpoint_path checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt --output_dir eval/vbench_5s

    # speed of the weight-free metrics on one core
    OMP_NUM_THREADS=1 python scripts/evaluate.py --benchmark --threads 1

Metric definitions: docs/evaluation.md. Exit status: 0 all videos scored, 1 some videos failed (the others are
scored and the failures listed), 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from omegaconf import OmegaConf  # noqa: E402

from reward_forcing.extras import MissingExtra, require  # noqa: E402

try:
    require("eval", "scripts/evaluate.py")
except MissingExtra as err:
    sys.exit(f"error: {err}")

from reward_forcing.evaluation import protocol as proto  # noqa: E402
from reward_forcing.evaluation.metrics import MetricConfig  # noqa: E402
from reward_forcing.evaluation.report import find_run_dir, load_run, write_report  # noqa: E402
from reward_forcing.evaluation.runner import ScoringOptions, evaluate_videos  # noqa: E402
from reward_forcing.evaluation.scorers import ScorerUnavailable  # noqa: E402
from reward_forcing.evaluation.videos import describe_videos, list_videos  # noqa: E402

log = logging.getLogger("evaluate")


class UsageError(Exception):
    """Bad command-line input, reported in one line without a traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    defaults = MetricConfig()
    p = argparse.ArgumentParser(
        description="Score videos (temporal flicker, motion, dynamic degree, block seams, first-frame copy,\n"
                    "drift; VideoReward VQ/MQ/TA and VBench when available), compare runs, or run an evaluation\n"
                    "protocol (generation with inference.py, then scoring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("videos", nargs="?", help="folder of .mp4 files to score")
    p.add_argument("--prompts", help="prompt file, one per line: video NNNN-...-sK.mp4 takes line NNNN (other names: "
                                     "the prompts in file order if there is one per video, else the file names)")
    p.add_argument("--extended_prompts", help="the extended prompts (same lines): the text the model saw")
    p.add_argument("--output_dir", help="where results go. Default: VIDEOS/eval; --compare: comparison; "
                                        "--protocol: required (videos in OUTPUT_DIR/videos, scores in OUTPUT_DIR/eval)")
    p.add_argument("--label", help="name of this run in tables and plots (default: the video folder's name)")

    g = p.add_argument_group("comparison")
    g.add_argument("--compare", nargs="+", metavar="DIR",
                   help="runs to put side by side: folders of videos (scored into DIR/eval first, unless already "
                        "scored) or evaluation folders")
    g.add_argument("--labels", nargs="+", help="one label per --compare folder")
    g.add_argument("--rescore", action="store_true", help="score --compare video folders again even if DIR/eval exists")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", help="evaluation protocol YAML (configs/eval/vbench_5s.yaml, long_30s.yaml)")
    g.add_argument("--checkpoint_path", help="generator weights passed to inference.py")
    g.add_argument("--nproc_per_node", type=int, default=1,
                   help="GPUs for generation; > 1 launches inference.py with torch.distributed.run")
    g.add_argument("--skip_generation", action="store_true", help="score the videos already in OUTPUT_DIR/videos")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol value, e.g. --set prompts.limit=50 --set generation.num_samples=1")

    g = p.add_argument_group("weight-free metrics")
    g.add_argument("--first_block_frames", type=int, default=defaults.first_block_frames,
                   help="frames of the student's first block (seam positions; protocols derive it from the config)")
    g.add_argument("--block_frames", type=int, default=defaults.block_frames, help="frames of every later block")
    g.add_argument("--window_frames", type=int, default=defaults.window_frames,
                   help="frames per time window of the per-window records and drift (16 = 1 s at 16 fps)")
    g.add_argument("--flow_short_side", type=int, default=defaults.flow_short_side,
                   help="optical flow runs at this short side (0 = native size; slower)")
    g.add_argument("--threads", type=int, default=None, help="OpenCV threads (default: OpenCV's choice)")

    g = p.add_argument_group("model-based scores")
    g.add_argument("--video_reward", choices=("auto", "on", "off"), default="auto",
                   help="VideoReward VQ/MQ/TA: auto = when its weights are present, on = required, off")
    g.add_argument("--config_path", default=str(REPO_ROOT / "configs" / "reward_forcing.yaml"),
                   help="model config naming the reward model and its preprocessing (configs/tiny.yaml: tiny random "
                        "model, for tests)")
    g.add_argument("--checkpoint_root", help="folder holding VideoReward/ (default: the config's checkpoint_root)")
    g.add_argument("--reward_prompt", choices=("extended", "short"), default="extended",
                   help="text VideoReward judges alignment against: the extended prompt the model saw, or the "
                        "short one")
    g.add_argument("--reward_batch_size", type=int, default=4, help="videos per VideoReward forward")
    g.add_argument("--device", default="auto", help="device of the model-based scorers (auto, cpu, cuda, cuda:N)")
    g.add_argument("--vbench", nargs="+", metavar="DIM", default=[],
                   help="VBench dimensions to run when the optional `vbench` package is installed, "
                        "e.g. subject_consistency dynamic_degree")
    g.add_argument("--vbench_full_info", help="VBench_full_info.json (default: the one shipped with vbench)")

    g = p.add_argument_group("report and benchmark")
    g.add_argument("--max_report_videos", type=int, default=24, help="videos with thumbnail strips in report.html")
    g.add_argument("--no_report", action="store_true", help="skip plots and report.html")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--benchmark", action="store_true",
                   help="time the weight-free metrics on a synthetic 81-frame 832x480 video and exit")
    g.add_argument("--repeats", type=int, default=3, help="benchmark repeats (the median is reported)")
    return p.parse_args(argv)


def scoring_options(args) -> ScoringOptions:
    metrics = MetricConfig(first_block_frames=args.first_block_frames, block_frames=args.block_frames,
                           window_frames=args.window_frames, flow_short_side=args.flow_short_side)
    overrides = [f"checkpoint_root={args.checkpoint_root}"] if args.checkpoint_root else []
    return ScoringOptions(metrics=metrics, video_reward=args.video_reward, reward_config=args.config_path,
                          reward_overrides=overrides, reward_prompt=args.reward_prompt,
                          reward_batch_size=args.reward_batch_size, device=args.device,
                          vbench_dimensions=args.vbench, vbench_full_info=args.vbench_full_info,
                          strips=not args.no_report).validate()


def finish(result, args) -> int:
    if not args.no_report:
        write_report([load_run(result.output_dir, result.label)], result.output_dir,
                     max_videos=args.max_report_videos)
    print(f"{result.summary['num_scored']} video(s) scored -> {result.output_dir}"
          + ("" if args.no_report else f" (report: {result.output_dir / 'report.html'})"))
    if result.failures:
        print(f"{len(result.failures)} video(s) failed:", file=sys.stderr)
        for name, reason in result.failures:
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


def score_folder(args) -> int:
    options = scoring_options(args)
    folder = Path(args.videos)
    entries = describe_videos(list_videos(folder), args.prompts, args.extended_prompts)
    out = Path(args.output_dir) if args.output_dir else folder / "eval"
    result = evaluate_videos(entries, out, options, label=args.label or folder.resolve().name,
                             progress=not args.quiet)
    return finish(result, args)


def compare(args) -> int:
    labels = args.labels or [None] * len(args.compare)
    if len(labels) != len(args.compare):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.compare)} --compare folders")
    options = scoring_options(args)
    plan = []  # (folder, existing run dir or None)
    for folder in map(Path, args.compare):
        if not folder.is_dir():
            raise UsageError(f"--compare folder '{folder}' does not exist")
        run_dir = None if args.rescore else find_run_dir(folder)
        if run_dir is None:
            list_videos(folder)  # fails now, before any work, if there is nothing to score
        plan.append((folder, run_dir))
    runs, failed = [], 0
    for (folder, run_dir), label in zip(plan, labels):
        if run_dir is None:
            entries = describe_videos(list_videos(folder), args.prompts, args.extended_prompts)
            result = evaluate_videos(entries, folder / "eval", options, label=label or folder.resolve().name,
                                     progress=not args.quiet)
            failed += len(result.failures)
            run_dir = result.output_dir
        runs.append(load_run(run_dir, label))
    out = Path(args.output_dir or "comparison")
    html = write_report(runs, out, max_videos=args.max_report_videos)
    print((out / "compare.md").read_text(), end="")
    print(f"comparison of {len(runs)} run(s) -> {out} (report: {html})")
    return 1 if failed else 0


def run_protocol(args) -> int:
    if not args.output_dir:
        raise UsageError("--protocol needs --output_dir (videos go to OUTPUT_DIR/videos, scores to OUTPUT_DIR/eval)")
    protocol = proto.load_protocol(args.protocol, args.set)
    extra = [f"checkpoint_root={args.checkpoint_root}"] if args.checkpoint_root else []
    protocol.generation.overrides = list(protocol.generation.overrides) + extra
    options = proto.scoring_options(protocol, device=args.device)
    options.strips = not args.no_report
    if args.vbench:
        options.vbench_dimensions = list(args.vbench)
    options.vbench_full_info = args.vbench_full_info
    out = Path(args.output_dir)
    videos_dir = out / "videos"
    if args.skip_generation:
        list_videos(videos_dir)  # fails now if there is nothing to score
    if args.checkpoint_path and not Path(args.checkpoint_path).is_file():
        raise UsageError(f"--checkpoint_path '{args.checkpoint_path}' does not exist")
    prompt_file, extended_file = proto.prepare_prompts(protocol, out / "prompts")
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(protocol)), encoding="utf-8")
    if not args.skip_generation:
        cmd = proto.generation_command(protocol, inference_script=REPO_ROOT / "inference.py",
                                       prompt_file=prompt_file, extended_file=extended_file,
                                       output_folder=videos_dir, checkpoint_path=args.checkpoint_path,
                                       nproc_per_node=args.nproc_per_node)
        (out / "generate_command.json").write_text(json.dumps(cmd, indent=1), encoding="utf-8")
        print("generating:", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            print(f"error: video generation failed (inference.py exit status {rc}); the command is in "
                  f"{out / 'generate_command.json'}", file=sys.stderr)
            return 1
    entries = describe_videos(list_videos(videos_dir), prompt_file, extended_file)
    result = evaluate_videos(entries, out / "eval", options, label=args.label or protocol.name,
                             progress=not args.quiet)
    return finish(result, args)


def benchmark(args) -> int:
    from reward_forcing.evaluation.benchmark import run_benchmark

    r = run_benchmark(repeats=args.repeats, threads=args.threads)
    print(f"weight-free metrics, {r['frames']} frames {r['width']}x{r['height']}, OpenCV threads "
          f"{r['opencv_threads']} (median of {args.repeats}):")
    print(f"  decode mp4      {r['decode_s']:.3f} s")
    print(f"  per-frame pass  {r['frame_pass_s']:.3f} s  (differences, colour statistics, thumbnails)")
    print(f"  optical flow    {r['flow_s']:.3f} s  (Farneback at short side 256, ~8 fps pairs)")
    print(f"  all metrics     {r['metrics_s']:.3f} s  (score_frames; decode excluded)")
    print(f"  total           {r['decode_s'] + r['metrics_s']:.3f} s per video")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        import cv2

        cv2.setNumThreads(args.threads)
    modes = [m for m in ("videos", "compare", "protocol", "benchmark") if getattr(args, m)]
    try:
        if len(modes) != 1:
            raise UsageError("give exactly one of: a video folder, --compare DIR..., --protocol FILE or --benchmark "
                             f"(got {', '.join(modes) or 'none'}); see --help")
        if args.max_report_videos < 0 or args.repeats < 1:
            raise UsageError("--max_report_videos must be >= 0 and --repeats >= 1")
        return {"videos": score_folder, "compare": compare, "protocol": run_protocol, "benchmark": benchmark}[
            modes[0]](args)
    except (UsageError, proto.ProtocolError, ScorerUnavailable, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
