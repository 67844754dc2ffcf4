"""Score a list of videos: decode each once, compute every metric from the same frames, write the records.

Output folder::

    videos.jsonl / videos.csv     one record per video (prompt, size, every metric)
    windows.jsonl / windows.csv   one record per video and time window (metrics over time, drift)
    summary.json / summary.md     mean / std / min / max per metric over the videos, failures, settings
    strips/<video>.png            a thumbnail strip per video (for the HTML report)

``videos.jsonl`` and ``windows.jsonl`` grow while the run goes, so a long run that dies keeps what it scored.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .metrics import VIDEO_METRICS, MetricConfig, score_frames
from .scorers import VIDEO_REWARD_DIMS, ScorerUnavailable, run_vbench, video_reward_scorer
from .videos import VideoEntry, VideoReadError, encode_png, read_video, thumbnail_strip

__all__ = ["ScoringOptions", "RunResult", "evaluate_videos", "summarise", "write_records", "summary_markdown",
           "clean_number", "SUMMARY_ORDER"]

log = logging.getLogger(__name__)

# Summary rows, in this order (whatever else was scored, e.g. vbench_*, follows alphabetically).
SUMMARY_ORDER = ("dynamic_degree",) + tuple(m for m in VIDEO_METRICS if m != "dynamic") + VIDEO_REWARD_DIMS


@dataclass
class ScoringOptions:
    """What to score besides the weight-free metrics, and how."""

    metrics: MetricConfig = field(default_factory=MetricConfig)
    video_reward: str = "auto"  # auto: score when the weights are there | on: required | off
    reward_config: str = "configs/reward_forcing.yaml"  # model config naming the reward model and its folder
    reward_overrides: Sequence[str] = ()
    reward_prompt: str = "extended"  # extended: the text the model saw (as in training) | short
    reward_batch_size: int = 4
    device: str = "auto"
    vbench_dimensions: Sequence[str] = ()
    vbench_full_info: str | None = None
    strips: bool = True

    def validate(self) -> ScoringOptions:
        self.metrics.validate()
        if self.video_reward not in ("auto", "on", "off"):
            raise ValueError(f"video_reward must be auto, on or off, got {self.video_reward!r}")
        if self.reward_prompt not in ("extended", "short"):
            raise ValueError(f"reward_prompt must be extended or short, got {self.reward_prompt!r}")
        if self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be >= 1, got {self.reward_batch_size}")
        return self


@dataclass
class RunResult:
    """A scored run: as produced by :func:`evaluate_videos`, or read back by ``report.load_run`` (whose failures
    and notes are empty: only the records are kept on disk)."""

    label: str
    output_dir: Path
    videos: list[dict[str, Any]]
    windows: list[dict[str, Any]]
    failures: list[tuple[str, str]]  # (file name, one-line reason)
    notes: list[str]  # scorers that were skipped, and why
    summary: dict[str, Any]


def clean_number(value: Any) -> Any:
    """JSON-safe value: numpy scalars to Python, NaN / inf to None."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return clean_number(obj)


def _jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps({k: clean_number(v) for k, v in record.items()}, ensure_ascii=False) + "\n"


def write_records(records: list[dict[str, Any]], jsonl_path: Path, csv_path: Path) -> None:
    """Write records as JSON lines and as CSV (columns in order of first appearance; NaN -> empty cell)."""
    import csv

    jsonl_path.write_text("".join(_jsonl_line(r) for r in records), encoding="utf-8")
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if clean_number(v) is None else clean_number(v)) for k, v in r.items()})


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric over the videos: mean, std, min, max and the number of videos with a value.

    ``dynamic_degree`` is the fraction of dynamic videos (VBench's dynamic degree)."""
    names = [m for m in SUMMARY_ORDER if m != "dynamic_degree"] + ["dynamic"]
    extra = sorted({k for r in records for k in r if k.startswith("vbench_")})
    out = {}
    for name in names + extra:
        values = np.array([r[name] for r in records if clean_number(r.get(name)) is not None], dtype=np.float64)
        if not values.size:
            continue
        key = "dynamic_degree" if name == "dynamic" else name
        out[key] = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                    "max": float(values.max()), "n": int(values.size)}
    order = {name: i for i, name in enumerate(SUMMARY_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def summary_markdown(label: str, summary: dict[str, Any]) -> str:
    """The summary table of one run as Markdown."""
    lines = [f"# Evaluation: {label}", "",
             f"{summary['num_scored']} video(s) scored, {len(summary['failures'])} failed.", "",
             "| metric | mean | std | min | max | videos |", "|---|---|---|---|---|---|"]
    for name, s in summary["metrics"].items():
        lines.append(f"| {name} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['min'])} | {_fmt(s['max'])} "
                     f"| {s['n']} |")
    if summary.get("vbench_averages"):
        lines += ["", "VBench's own averages (each dimension over its prompt subset):", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in summary["vbench_averages"].items()]
    if summary["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    if summary["failures"]:
        lines += ["", "Failed videos:", ""] + [f"- {name}: {reason}" for name, reason in summary["failures"]]
    return "\n".join(lines) + "\n"


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def evaluate_videos(entries: Sequence[VideoEntry], output_dir: str | os.PathLike, options: ScoringOptions | None = None,
                    *, label: str | None = None, progress: bool = True) -> RunResult:
    """Score ``entries`` into ``output_dir`` (created; earlier result files there are replaced).

    A video that cannot be decoded or is too short is reported on one line and skipped; the others are scored
    and the failures are listed in the summary. Optional scorers that cannot run are reported once and skipped.
    """
    options = (options or ScoringOptions()).validate()
    out = Path(output_dir)
    label = label or out.name
    notes: list[str] = []
    scorer = None
    if options.video_reward != "off":
        try:
            scorer = video_reward_scorer(options.reward_config, overrides=options.reward_overrides,
                                         device=options.device, batch_size=options.reward_batch_size)
        except ScorerUnavailable as err:
            if options.video_reward == "on":
                raise
            notes.append(str(err))
            _say(f"note: {err}")
    out.mkdir(parents=True, exist_ok=True)  # only now: a required scorer that is missing writes nothing
    strips_dir = out / "strips"
    if options.strips:
        strips_dir.mkdir(exist_ok=True)

    videos: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    scored: list[VideoEntry] = []
    pending: list[tuple[dict, list[dict], np.ndarray, str]] = []  # (record, windows, frames, reward prompt)
    videos_jsonl = open(out / "videos.jsonl", "w", encoding="utf-8")
    windows_jsonl = open(out / "windows.jsonl", "w", encoding="utf-8")

    def emit(record: dict, rows: list[dict]) -> None:
        videos.append(record)
        windows.extend(rows)
        videos_jsonl.write(_jsonl_line(record))
        windows_jsonl.writelines(_jsonl_line(r) for r in rows)
        videos_jsonl.flush()
        windows_jsonl.flush()

    def flush_rewards() -> None:
        nonlocal scorer
        if not pending:
            return
        try:
            scores = scorer([p[2] for p in pending], [p[3] for p in pending], [p[0]["fps"] for p in pending])
        except Exception as err:  # noqa: BLE001 -- e.g. out of memory: keep the weight-free metrics
            notes.append(f"VideoReward failed on {len(pending)} video(s) and was switched off: "
                         f"{type(err).__name__}: {err}")
            _say(f"warning: {notes[-1]}")
            scores, scorer = [{}] * len(pending), None
        for (record, rows, _, _), s in zip(pending, scores):
            record.update(s)
            emit(record, rows)
        pending.clear()

    try:
        for entry in tqdm(entries, desc=f"scoring {label}", unit="video", disable=not progress, file=sys.stderr):
            start = time.perf_counter()
            try:
                frames, fps = read_video(entry.path)
                scores = score_frames(frames, fps, options.metrics)
            except ValueError as err:  # VideoReadError is one
                reason = str(err)
                failures.append((entry.name, reason))
                _say(f"error: skipping {entry.name}: {reason}")
                continue
            n, h, w = frames.shape[:3]
            record = {"run": label, "video": entry.name, "prompt": entry.prompt, "prompt_index": entry.prompt_index,
                      "sample": entry.sample, "prompt_source": entry.prompt_source, "num_frames": n, "fps": fps,
                      "height": h, "width": w, "duration_s": n / fps, **scores.video}
            rows = [{"run": label, "video": entry.name, **row} for row in scores.windows]
            if options.strips:
                (strips_dir / f"{entry.path.stem}.png").write_bytes(encode_png(thumbnail_strip(frames)))
            record["seconds"] = time.perf_counter() - start
            scored.append(entry)
            if scorer is not None:
                text = entry.conditioning if options.reward_prompt == "extended" else entry.prompt
                pending.append((record, rows, frames, text))
                if len(pending) >= options.reward_batch_size:
                    flush_rewards()
            else:
                emit(record, rows)
            del frames
        if scorer is not None:
            flush_rewards()
    finally:
        videos_jsonl.close()
        windows_jsonl.close()

    vbench_averages: dict[str, float] = {}
    if options.vbench_dimensions and scored:
        try:
            per_video, vbench_averages = run_vbench(scored, options.vbench_dimensions, out / "vbench",
                                                    device=options.device, full_info=options.vbench_full_info)
            for record in videos:
                record.update(per_video.get(record["video"], {}))
        except ScorerUnavailable as err:
            notes.append(str(err))
            _say(f"note: {err}")

    write_records(videos, out / "videos.jsonl", out / "videos.csv")
    write_records(windows, out / "windows.jsonl", out / "windows.csv")
    summary = {"run": label, "num_videos": len(entries), "num_scored": len(videos), "failures": failures,
               "notes": notes, "metrics": summarise(videos), "vbench_averages": vbench_averages,
               "settings": {"metrics": options.metrics.to_dict(), "video_reward": options.video_reward,
                            "reward_config": str(options.reward_config), "reward_prompt": options.reward_prompt,
                            "vbench_dimensions": list(options.vbench_dimensions)}}
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2), encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(label, summary), encoding="utf-8")
    return RunResult(label, out, videos, windows, failures, notes, summary)
