"""The toy world's report: the gates as a markdown table and the plots people would rather look at.

``write(out, results, videos, prompts)`` writes into ``out``: ``report.md``, ``losses.png`` (training losses of
every stage, from the runs' ``log.jsonl``), ``motion_any.png`` (net motion on the bimodal prompts, beta 0 vs
beta > 0), ``long_rollout.png`` (motion and copy score over time per sink policy) and ``frames.png`` (frames
rendered from latents: the data, the teacher, the ODE init, DMD and Re-DMD students).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..extras import require

require("eval", "the toy world's report plots")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _log(path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if key in entry:
                steps.append(entry["step"])
                values.append(entry[key])
    return steps, values


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _smooth(values: list[float], width: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def plot_losses(out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (title, runs) in zip(axes, [("teacher (flow matching)", [("teacher", "teacher_loss")]),
                                        ("ODE init (x0 regression)", [("ode", "generator_loss")]),
                                        ("DMD / Re-DMD", None)]):
        if runs is None:
            runs = [(d.name, key) for d in sorted(out.glob("dmd_*")) for key in ("generator_loss", "critic_loss")]
        for name, key in runs:
            steps, values = _log(out / name / "log.jsonl", key)
            if steps:
                label = name.removeprefix("dmd_") + ("" if title.startswith(("teacher", "ODE")) else
                                                     f" {key.split('_')[0]}")
                ax.plot(steps, _smooth(values), label=label, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize=6, ncol=2 if len(runs) > 2 else 1)
    return _save(fig, out / "losses.png")


def plot_motion_any(out: Path, results: dict) -> Path:
    beta = results["beta"]
    pooled = {0.0: [], beta: []}
    for name, motion in results["motion_any"].items():
        b = float(name.split("_")[0].removeprefix("beta"))
        pooled.setdefault(b, []).extend(motion)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    top = max(max(v, default=0) for v in pooled.values()) + 0.05
    bins = torch.linspace(0, max(top, 1.0), 31).tolist()
    for b, motion in pooled.items():
        ax.hist(motion, bins=bins, alpha=0.55, label=f"beta {b:g} ({len(motion)} samples)")
    ax.axvline(results["data"]["fast_motion"] / 2, color="k", ls="--", lw=1, label="fast / static threshold")
    ax.set_xlabel("net motion (px / frame) on the 'any speed' prompts")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    return _save(fig, out / "motion_any.png")


def plot_long_rollout(out: Path, results: dict) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for policy, series in results["long_windows"].items():
        axes[0].plot(series["frame"], series["motion"], label=policy)
        axes[1].plot(series["frame"], series["copy"], label=policy)
    axes[0].set_ylabel("net motion (px / frame), 9-frame windows")
    axes[1].set_ylabel("copy score (correlation with frame 0)")
    for ax in axes:
        ax.set_xlabel("frame")
        ax.legend(title="sink policy", fontsize=7)
    return _save(fig, out / "long_rollout.png")


def to_rgb(latents: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """Toy latents ``[F, 3, H, W]`` in [-1, 1] -> an image strip ``[H * scale, F * W * scale, 3]`` in [0, 1]."""
    x = ((latents.float().clamp(-1, 1) + 1) / 2).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    frames = [torch.nn.functional.pad(f.permute(1, 2, 0), (0, 0, 0, 2), value=1.0) for f in x]
    return torch.cat(frames, dim=1)


def plot_frames(out: Path, videos: dict[str, torch.Tensor], prompts: list[str], rows: list[int]) -> Path:
    names = [n for n in ("data", "teacher", "ode", "beta0_seed0") if n in videos]
    names += sorted(n for n in videos if n.startswith("beta") and n.endswith("_seed0") and n not in names)
    fig, axes = plt.subplots(len(names), len(rows), figsize=(4.2 * len(rows), 0.75 * len(names) + 0.4),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, row in enumerate(rows):
            ax = axes[i][j]
            ax.imshow(to_rgb(videos[name][row]).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(prompts[row] if name != "data" else prompts[row] + " (data)", fontsize=8)
    return _save(fig, out / "frames.png", dpi=100)


def write(out: Path, results: dict, videos: dict[str, torch.Tensor], prompts: list[str]) -> Path:
    out = Path(out)
    plots = [plot_losses(out), plot_motion_any(out, results), plot_long_rollout(out, results)]
    static = next(i for i, p in enumerate(prompts) if " static " in p)
    fast = [i for i, p in enumerate(prompts) if " fast " in p][:2]
    plots.append(plot_frames(out, videos, prompts, [static, *fast]))
    lines = ["| stage | gate | value | threshold | data | result |", "|---|---|---|---|---|---|"]
    for r in results["gates"]:
        verdict = "pass" if r["pass"] else "**fail**"
        lines.append(f"| {r['stage']} | {r['gate']} | {r['value']:.3f} | {r['threshold']} | {r['data']} | "
                     f"{verdict}{'' if r['kind'] == 'engineering' else ' (research)'} |")
    lines += ["", "| run | static motion | fast motion | direction (fast) | any: fast fraction | flicker | colour | "
              "blobs/frame |", "|---|---|---|---|---|---|---|---|"]
    runs = {"teacher": results["teacher"], "ode init": results["ode"], **results["dmd"]}
    for name, g in runs.items():
        lines.append(f"| {name} | {g['static']['net_motion']:.3f} | {g['fast']['net_motion']:.3f} | "
                     f"{g['fast']['direction_accuracy']:.3f} | {g['any']['fast_fraction']:.3f} | {g['all']['flicker']:.3f} | "
                     f"{g['all']['colour_accuracy']:.3f} | {g['all']['blobs_per_frame']:.2f} |")
    lines += ["", "| sink policy | std last/first | colour | motion first 21 | motion last 21 | copy first 21 | "
              "copy last 21 |", "|---|---|---|---|---|---|---|"]
    for policy, d in results["long_rollout"].items():
        lines.append(f"| {policy} | {d['std_ratio']:.3f} | {d['colour_accuracy']:.3f} | {d['motion_first']:.3f} | "
                     f"{d['motion_last']:.3f} | {d['copy_first']:.3f} | {d['copy_last']:.3f} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_fast_fraction(out: Path, curves: dict[str, dict[int, list[float]]], teacher: float | None = None,
                       name: str = "redmd_fast_fraction.png") -> Path:
    """Fast fraction of the ``any`` prompts against generator updates: ``curves[method][updates] = [per seed]``;
    each seed a thin line, the mean a thick one."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, points) in enumerate(curves.items()):
        colour = f"C{i}"
        xs = sorted(points)
        seeds = len(points[xs[-1]])
        for s in range(seeds):
            ax.plot(xs, [points[x][s] for x in xs], color=colour, lw=0.6, alpha=0.4)
        ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], color=colour, lw=2.2, label=method, marker="o")
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("generator updates")
    ax.set_ylabel("fast fraction on the 'any' prompts")
    ax.legend(fontsize=8)
    return _save(fig, out / name)
