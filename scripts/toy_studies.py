"""Measure the live features (and two speed levers) on the committed toy student, with the toy world's exact metrics.

    python scripts/toy_studies.py live     # prompt switches: every policy x blend 0 / 2 x colour / direction / speed
    python scripts/toy_studies.py media    # image start and video extension
    python scripts/toy_studies.py levers   # no context pass; 3 and 2 denoising steps: quality and block-loop speed
    python scripts/toy_studies.py all      # the three, one after the other (a few minutes on a CPU)
    python scripts/toy_studies.py live --smoke   # a few clips on random weights: the code path (CI)

Each study prints its tables and gates, writes ``<out>/<study>.json`` and ``<out>/<study>.md``, and exits 1 when a
gate fails (never with ``--smoke``). Definitions: ``reward_forcing/toy/studies.py``; results: docs/interactive.md
("Measured in the toy world") and docs/toy_world.md ("Speed levers").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_forcing.build import build_pipeline  # noqa: E402
from reward_forcing.config import load_config  # noqa: E402
from reward_forcing.toy import evaluate as ev  # noqa: E402
from reward_forcing.toy import studies  # noqa: E402

STUDENT = ROOT / "configs/toy/student.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Extra key=value arguments override "
                                "the student's config (configs/toy/student.yaml).")
    p.add_argument("study", choices=["live", "media", "levers", "all"])
    p.add_argument("--out", default="runs/toy_studies", help="output folder (default runs/toy_studies)")
    p.add_argument("--smoke", action="store_true", help="a few clips on random weights; gates not enforced")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the student's config")
    return p.parse_intermixed_args(argv)


def student_config(args, extra=()):
    smoke = ["model.random_init=true", "model.checkpoint=''"] if args.smoke else []
    return load_config(STUDENT, [*smoke, *args.overrides, *extra])


def fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def gate_table(rows: list[dict]) -> str:
    return table(["gate", "value", "threshold", "result"],
                 [[r["gate"], r["value"], r["threshold"], "pass" if r["pass"] else "**FAIL**"] for r in rows])


# ---------------------------------------------------------------------------------------------- studies
def live(args) -> tuple[dict, str, list[dict]]:
    pipe = build_pipeline(student_config(args))
    results = studies.switch_study(pipe, repeats=1 if args.smoke else 4, pairs=2 if args.smoke else None,
                                   policies=("cross", "reset") if args.smoke else studies.POLICIES, progress=True)
    rows = []
    for policy, by_blend in results.items():
        for blend, by_kind in by_blend.items():
            for kind, m in by_kind.items():
                lat = m["latency_frames"]
                jump = m.get("jump_px", {"median": "-", "p90": "-"})
                from_old = m.get("jump_from_old_motion_px", {"median": "-"})
                rows.append([policy, blend, kind, lat["median"], lat["p90"], m["within_2_blocks"], jump["median"],
                             jump["p90"], from_old["median"], m["colour_accuracy_after"], m["blobs_per_frame_after"]])
    text = table(["policy", "blend", "switch", "latency median (frames)", "latency p90", "within 2 blocks",
                  "jump median (px)", "jump p90", "jump from old motion, median", "colour after",
                  "blobs/frame after"], rows)
    return results, text, studies.switch_gates(results)


def media(args) -> tuple[dict, str, list[dict]]:
    pipe = build_pipeline(student_config(args))
    results = studies.media_study(pipe, clips=2 if args.smoke else 48, progress=True)
    i, e = results["image_start"], results["extension"]
    text = table(["start", "position error / seam jump (px), median", "p90", "distance from the image (px), median",
                  "speed (px/frame) / ratio at the seam, median", "speed ratio over 3 blocks", "colour accuracy",
                  "direction accuracy"],
                 [["image", i["start_error_px"]["median"], i["start_error_px"]["p90"],
                   i["start_distance_px"]["median"], i["speed"]["median"], "-", i["colour_accuracy"],
                   i["direction_accuracy"]],
                  ["video extension", e["seam_jump_px"]["median"], e["seam_jump_px"]["p90"], "-",
                   e["seam_speed_ratio"]["median"], e["speed_ratio"]["median"], e["colour_accuracy"],
                   e["direction_accuracy"]]])
    return results, text, studies.media_gates(results)


LEVERS = {  # name -> config overrides (the student was distilled for [1000, 750, 500, 250] with the context pass)
    "4 steps + context pass": [],
    "4 steps, no context pass": ["schedule.context_pass=false"],
    "3 steps (1000, 750, 500)": ["schedule.denoising_step_list=[1000,750,500]"],
    "2 steps (1000, 500)": ["schedule.denoising_step_list=[1000,500]"],
    "2 steps, no context pass": ["schedule.denoising_step_list=[1000,500]", "schedule.context_pass=false"],
}


def levers(args) -> tuple[dict, str, list[dict]]:
    prompts = ev.eval_prompts(("static", "fast"), 1 if args.smoke else 4)[::4 if args.smoke else 1]
    results, rows = {}, []
    for name, overrides in tqdm(LEVERS.items(), desc="levers", unit="setting", file=sys.stderr):
        pipe = build_pipeline(student_config(args, overrides))
        groups = ev.as_dict(ev.group_metrics(ev.sample_student_videos(pipe, prompts), prompts))
        block_s = studies.time_block_loop(pipe, [prompts[0]], repeats=1 if args.smoke else 5)
        results[name] = {"groups": groups, "block_ms": 1000 * block_s}
    base = results["4 steps + context pass"]
    for name, r in results.items():
        g = r["groups"]
        rows.append([name, g["static"]["net_motion"], g["fast"]["net_motion"], g["fast"]["direction_accuracy"],
                     g["all"]["flicker"], g["all"]["colour_accuracy"], g["all"]["blobs_per_frame"], r["block_ms"],
                     base["block_ms"] / r["block_ms"]])
    text = table(["sampling", "static motion", "fast motion", "direction", "flicker", "colour", "blobs/frame",
                  "ms per block (batch 1)", "speed-up"], rows)
    return results, text, []  # measured, not gated: the table is the result


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:  # called in-process (the tests), the caller's thread count is left as it was
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in (["live", "media", "levers"] if args.study == "all" else [args.study]):
        start = time.time()
        with torch.no_grad():
            results, text, gates = {"live": live, "media": media, "levers": levers}[name](args)
        minutes = (time.time() - start) / 60
        report = f"## {name} ({minutes:.1f} min)\n\n{text}\n" + (f"\n{gate_table(gates)}\n" if gates else "")
        print(report, flush=True)
        (out / f"{name}.json").write_text(json.dumps({"results": results, "gates": gates, "smoke": args.smoke,
                                                      "minutes": minutes}, indent=1))
        (out / f"{name}.md").write_text(report)
        failed |= any(not g["pass"] for g in gates)
    return 0 if args.smoke or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
