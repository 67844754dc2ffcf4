"""Reports over one or more scored runs: side-by-side tables, plots and a self-contained HTML page.

``write_report(runs, output_dir)`` writes

    compare.md / compare.csv        the summary of every run side by side (one column per run)
    compare_videos.csv              per-video metrics side by side, matched by file name (same prompt and seed)
    metrics_over_time.png           each per-window metric over time, mean over the videos, one line per run
    histograms.png                  the distribution of each per-video metric, one colour per run
    report.html                     all of the above plus a thumbnail strip per video, images inlined (base64),
                                    so the file opens from disk anywhere
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import WINDOW_METRICS
from .runner import SUMMARY_ORDER, RunResult, clean_number

__all__ = ["load_run", "find_run_dir", "write_report", "comparison_markdown", "TIME_METRICS",
           "HISTOGRAM_METRICS"]

# Plotted per window over time (absolute colour statistics are left to the CSV; their drift is plotted).
TIME_METRICS = tuple(m for m in WINDOW_METRICS if m not in ("luma", "contrast", "saturation", "sharpness"))
# Per-video distributions.
HISTOGRAM_METRICS = ("frame_diff", "flow_mean", "flow_top5", "temporal_flickering", "seam_ratio",
                     "first_frame_copy", "hist_drift", "luma_drift", "VQ", "MQ", "TA")
# Columns of the side-by-side per-video table.
VIDEO_COLUMNS = ("flow_mean", "dynamic", "seam_ratio", "first_frame_copy", "hist_drift", "VQ", "MQ", "TA")


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """The folder holding a run's ``summary.json``: ``path`` itself or its ``eval/`` sub-folder; None if neither."""
    path = Path(path)
    for candidate in (path, path / "eval"):
        if (candidate / "summary.json").is_file() and (candidate / "videos.jsonl").is_file():
            return candidate
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_run(folder: str | os.PathLike, label: str | None = None) -> RunResult:
    """Read a run written by ``evaluate_videos``. Raises FileNotFoundError when ``folder`` holds none."""
    found = find_run_dir(folder)
    if found is None:
        raise FileNotFoundError(f"'{folder}' holds no evaluation results (summary.json + videos.jsonl); score it "
                                f"first with `python scripts/evaluate.py {folder}`")
    summary = json.loads((found / "summary.json").read_text(encoding="utf-8"))
    return RunResult(label or summary.get("run") or found.name, found, _read_jsonl(found / "videos.jsonl"),
                     _read_jsonl(found / "windows.jsonl"), failures=[], notes=[], summary=summary)


def _num(value: Any) -> float:
    value = clean_number(value)
    return float("nan") if value is None or isinstance(value, str) else float(value)


def _fmt(value: float) -> str:
    return "-" if not math.isfinite(value) else (f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}")


def _metric_names(runs: list[RunResult]) -> list[str]:
    seen = {name for run in runs for name in run.summary.get("metrics", {})}
    order = {name: i for i, name in enumerate(SUMMARY_ORDER)}
    return sorted(seen, key=lambda n: (order.get(n, len(order)), n))


def comparison_markdown(runs: list[RunResult]) -> str:
    """Summary means (± std) of every run side by side, one column per run."""
    names = _metric_names(runs)
    lines = ["| metric | " + " | ".join(r.label for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        cells = []
        for run in runs:
            s = run.summary.get("metrics", {}).get(name)
            cells.append("-" if s is None else f"{_fmt(s['mean'])} ± {_fmt(s['std'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| videos scored | " + " | ".join(str(r.summary.get("num_scored", len(r.videos))) for r in runs)
                 + " |")
    lines.append("| failed | " + " | ".join(str(len(r.summary.get("failures", []))) for r in runs) + " |")
    return "\n".join(lines) + "\n"


def _write_comparison_csv(runs: list[RunResult], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "statistic"] + [r.label for r in runs])
        for name in _metric_names(runs):
            for stat in ("mean", "std", "n"):
                writer.writerow([name, stat] + [run.summary.get("metrics", {}).get(name, {}).get(stat, "")
                                                for run in runs])


def _video_names(runs: list[RunResult]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(v["video"] for v in run.videos))
    return sorted(names)


def _write_videos_csv(runs: list[RunResult], path: Path) -> None:
    by_run = [{v["video"]: v for v in run.videos} for run in runs]
    metrics = [m for m in SUMMARY_ORDER if m != "dynamic_degree"] + ["dynamic"]
    metrics = [m for m in metrics if any(m in v for run in runs for v in run.videos)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "prompt"] + [f"{m}@{r.label}" for m in metrics for r in runs])
        for name in _video_names(runs):
            prompt = next((d[name].get("prompt", "") for d in by_run if name in d), "")
            row = []
            for m in metrics:
                for d in by_run:
                    value = clean_number(d.get(name, {}).get(m))
                    row.append("" if value is None else value)
            writer.writerow([name, prompt] + row)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _new_grid(n: int):
    """pyplot and a figure with a grid of at least ``n`` panels, at most 4 per row."""
    plt = _pyplot()
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    return plt, fig, axes


def plot_over_time(runs: list[RunResult], path: Path) -> bool:
    """Mean over videos of each per-window metric against window start time; one line per run."""
    metrics = [m for m in TIME_METRICS if any(_num(w.get(m)) == _num(w.get(m)) for r in runs for w in r.windows)]
    if not metrics:
        return False
    plt, fig, axes = _new_grid(len(metrics))
    for ax, metric in zip(axes.flat, metrics):
        for run in runs:
            by_window: dict[int, list[float]] = {}
            times: dict[int, list[float]] = {}
            for w in run.windows:
                value = _num(w.get(metric))
                if math.isfinite(value):
                    by_window.setdefault(int(w["window"]), []).append(value)
                    times.setdefault(int(w["window"]), []).append(_num(w.get("t_start")))
            if not by_window:
                continue
            keys = sorted(by_window)
            x = [float(np.mean(times[k])) for k in keys]
            y = np.array([np.mean(by_window[k]) for k in keys])
            sd = np.array([np.std(by_window[k]) for k in keys])
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=run.label)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("time (s)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    return _save_grid(plt, fig, axes, len(metrics), "Per-window metrics over time (mean ± std over videos)", path)


def plot_histograms(runs: list[RunResult], path: Path) -> bool:
    """Distribution of each per-video metric over the videos; one colour per run, shared bins."""
    metrics = []
    for m in HISTOGRAM_METRICS:
        values = [_num(v.get(m)) for r in runs for v in r.videos]
        if any(math.isfinite(x) for x in values):
            metrics.append(m)
    if not metrics:
        return False
    plt, fig, axes = _new_grid(len(metrics))
    for ax, metric in zip(axes.flat, metrics):
        data = [np.array([x for x in (_num(v.get(metric)) for v in r.videos) if math.isfinite(x)]) for r in runs]
        every = np.concatenate([d for d in data if d.size])
        lo, hi = float(every.min()), float(every.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        for run, values in zip(runs, data):
            if values.size:
                ax.hist(values, bins=bins, alpha=0.5, label=run.label)
        ax.set_title(metric, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
    return _save_grid(plt, fig, axes, len(metrics), "Per-video metrics", path)


def _save_grid(plt, fig, axes, used: int, title: str, path: Path) -> bool:
    """Blank the unused panels of a subplot grid, add the legend and title, write the PNG."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f2f2f2}
img{max-width:100%}
.strip{display:block;height:72px;max-width:none}
.scroll{overflow-x:auto}
.small{color:#666;font-size:12px}
"""


def _img(data: bytes, alt: str, cls: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _summary_html(runs: list[RunResult]) -> str:
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = []
    for name in _metric_names(runs):
        cells = []
        for run in runs:
            s = run.summary.get("metrics", {}).get(name)
            cells.append("<td>-</td>" if s is None else
                         f"<td>{_fmt(s['mean'])} <span class=small>± {_fmt(s['std'])}</span></td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    rows.append("<tr><td>videos scored</td>" + "".join(
        f"<td>{r.summary.get('num_scored', len(r.videos))}</td>" for r in runs) + "</tr>")
    rows.append("<tr><td>failed</td>" + "".join(
        f"<td>{len(r.summary.get('failures', []))}</td>" for r in runs) + "</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _videos_html(runs: list[RunResult], names: list[str]) -> str:
    by_run = [{v["video"]: v for v in run.videos} for run in runs]
    columns = [c for c in VIDEO_COLUMNS if any(c in v for d in by_run for v in d.values())]
    head = "".join(f"<th>{html.escape(c)}@{html.escape(r.label)}</th>" for c in columns for r in runs)
    rows = []
    for name in names:
        cells = "".join(f"<td>{_fmt(_num(d.get(name, {}).get(c)))}</td>" for c in columns for d in by_run)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<div class=scroll><table><tr><th>video</th>{head}</tr>{''.join(rows)}</table></div>"


def _strips_html(runs: list[RunResult], names: list[str]) -> str:
    by_run = [{v["video"]: v for v in run.videos} for run in runs]
    blocks = []
    for name in names:
        prompt = next((d[name].get("prompt", "") for d in by_run if name in d), "")
        cells = []
        for run in runs:
            strip = run.output_dir / "strips" / f"{Path(name).stem}.png"
            image = _img(strip.read_bytes(), f"{run.label}: {name}", "strip") if strip.is_file() else "(none)"
            cells.append(f"<tr><td>{html.escape(run.label)}</td><td class=scroll>{image}</td></tr>")
        blocks.append(f"<h3>{html.escape(name)}</h3><p class=small>{html.escape(prompt)}</p>"
                      f"<table>{''.join(cells)}</table>")
    return "".join(blocks)


def write_report(runs: list[RunResult], output_dir: str | os.PathLike, *, max_videos: int = 24,
                 title: str | None = None) -> Path:
    """Write the comparison tables, the two plots and ``report.html`` for ``runs``; returns the HTML path."""
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(comparison_markdown(runs), encoding="utf-8")
    _write_comparison_csv(runs, out / "compare.csv")
    _write_videos_csv(runs, out / "compare_videos.csv")
    plots = []
    for name, fn, caption in (("metrics_over_time.png", plot_over_time, "Metrics over time"),
                              ("histograms.png", plot_histograms, "Distributions over videos")):
        if fn(runs, out / name):
            plots.append((caption, (out / name).read_bytes()))

    names = _video_names(runs)
    shown = names[:max_videos]
    title = title or ("Evaluation: " + " vs ".join(r.label for r in runs))
    parts = [f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class=small>Metric definitions: docs/evaluation.md. Runs: "
             + ", ".join(f"{html.escape(r.label)} ({html.escape(str(r.output_dir))})" for r in runs) + "</p>",
             "<h2>Summary (mean ± std over videos)</h2>", _summary_html(runs)]
    for caption, data in plots:
        parts += [f"<h2>{caption}</h2>", _img(data, caption)]
    more = f" (first {len(shown)} of {len(names)})" if len(names) > len(shown) else ""
    parts += [f"<h2>Videos{more}</h2>", _videos_html(runs, shown), _strips_html(runs, shown)]
    notes = [(r.label, n) for r in runs for n in r.summary.get("notes", [])]
    failures = [(r.label, name, why) for r in runs for name, why in r.summary.get("failures", [])]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(l)}: {html.escape(n)}</li>"
                                                     for l, n in notes) + "</ul>")
    if failures:
        parts.append("<h2>Failed videos</h2><ul>" + "".join(
            f"<li>{html.escape(l)}: {html.escape(n)}: {html.escape(w)}</li>" for l, n, w in failures) + "</ul>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
