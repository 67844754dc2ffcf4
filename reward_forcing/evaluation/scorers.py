"""Model-based scores: VideoReward VQ / MQ / TA, and VBench dimensions through the optional ``vbench`` package.

Both are optional. When the weights (or the package) are missing, ``ScorerUnavailable`` says what to install or
download, and the evaluation goes on with the weight-free metrics.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["ScorerUnavailable", "video_reward_scorer", "VIDEO_REWARD_DIMS", "run_vbench", "vbench_video_name"]

log = logging.getLogger(__name__)

VIDEO_REWARD_DIMS = ("VQ", "MQ", "TA")
VIDEO_REWARD_DOWNLOAD = (
    "download KlingTeam/VideoReward into <checkpoint_root>/VideoReward, e.g. "
    "`hf download KlingTeam/VideoReward --local-dir checkpoints/VideoReward` "
    "(`bash download_checkpoints.sh --train` fetches it too, with the other training assets)")
VBENCH_INSTALL = ("install it with `pip install -e \".[vbench]\"` (or `pip install vbench`); VBench downloads its "
                  "own model weights on first use")


class ScorerUnavailable(RuntimeError):
    """An optional scorer cannot run here (weights or package missing); the message says how to get it."""


def video_reward_scorer(config_path: str | os.PathLike, *, overrides: Sequence[str] = (), device: str = "auto",
                        batch_size: int = 4) -> Callable[..., list[dict[str, float]]]:
    """Load VideoReward as training builds it and return ``score(videos, prompts, fps=None) -> [{"VQ", "MQ",
    "TA"}]``.

    ``config_path`` (+ ``overrides``, e.g. ``checkpoint_root=/data/ckpt``) is a model config: the reward model,
    its folder and its preprocessing (frame sampling, pixel range) come from it exactly as in training, so the
    numbers are the ones Re-DMD weights its loss with (``configs/tiny.yaml`` gives the tiny random model).
    ``videos`` are uint8 ``[T, H, W, 3]`` arrays and ``fps`` their frame rates (the model samples frames in time;
    None: Wan's 16 fps); they are scored ``batch_size`` at a time and the scores are the normalised (z-scored)
    VQ / MQ / TA. Raises ScorerUnavailable when the weights are missing.

    This is the only function that touches the VideoReward API.
    """
    import torch

    from reward_forcing.build import build_reward, resolve_device, resolve_dtype
    from reward_forcing.config import load_config

    cfg = load_config(config_path, list(overrides))
    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)
    try:
        model = build_reward(cfg, device=device, dtype=dtype)
    except FileNotFoundError as err:
        raise ScorerUnavailable(f"VideoReward VQ/MQ/TA skipped: {err} -- {VIDEO_REWARD_DOWNLOAD}") from None

    def score(videos: list[np.ndarray], prompts: list[str], fps: Sequence[float] | None = None
              ) -> list[dict[str, float]]:
        groups: dict[float | None, list[int]] = {}  # one call per frame rate
        for i, rate in enumerate(fps if fps is not None else [None] * len(videos)):
            groups.setdefault(rate, []).append(i)
        results: list[dict[str, float]] = [{} for _ in videos]
        with torch.inference_mode():
            for rate, index in groups.items():
                out = model.score([torch.from_numpy(np.ascontiguousarray(videos[i])) for i in index],
                                  [prompts[i] for i in index], max_batch_size=batch_size, source_fps=rate)
                for j, i in enumerate(index):
                    results[i] = {dim: float(out[dim][j]) for dim in VIDEO_REWARD_DIMS}
        return results

    return score


def vbench_video_name(prompt: str, sample: int) -> str:
    """VBench's file name for a sample of a prompt: ``{prompt}-{sample}.mp4`` (a ``/`` would make a folder)."""
    return f"{prompt.replace('/', ' ')}-{sample}.mp4"


def run_vbench(entries: Sequence, dimensions: Sequence[str], work_dir: str | os.PathLike, *, device: str = "auto",
               full_info: str | os.PathLike | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Score videos on VBench ``dimensions`` with the installed ``vbench`` package.

    ``entries`` are ``VideoEntry`` records (path, short prompt, sample). The videos are linked into
    ``work_dir/videos`` under VBench's names; if every prompt is in VBench's prompt list (``full_info``, default:
    the one shipped with the package) VBench runs in its standard mode, which scores each dimension on its own
    prompt subset; otherwise in ``custom_input`` mode (dimensions that need VBench's own prompt metadata are
    then dropped). Returns ``(per-video {video name: {"vbench_<dim>": score}}, VBench's averages
    {"vbench_<dim>": score})``. Raises ScorerUnavailable when ``vbench`` is not installed.
    """
    from reward_forcing.build import resolve_device

    try:
        from vbench import VBench
    except ImportError as err:
        raise ScorerUnavailable(f"VBench dimensions skipped: the optional package `vbench` is not importable "
                                f"({err}); {VBENCH_INSTALL}") from None
    import vbench

    work_dir = Path(work_dir)
    video_dir = work_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for e in entries:
        link = video_dir / vbench_video_name(e.prompt, e.sample)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(e.path.resolve())
        links[link.name] = e.name

    full_info = Path(full_info) if full_info else Path(vbench.__file__).parent / "VBench_full_info.json"
    known = set()
    if full_info.is_file():
        known = {item["prompt_en"] for item in json.loads(full_info.read_text())}
    standard = bool(known) and all(e.prompt in known for e in entries)
    dims = list(dimensions)
    if not standard:
        needs_metadata = {"object_class", "multiple_objects", "scene", "appearance_style", "color",
                          "spatial_relationship"}
        dropped = [d for d in dims if d in needs_metadata]
        if dropped:
            log.warning("VBench: %s need VBench's own prompt list and are skipped for these prompts", dropped)
        dims = [d for d in dims if d not in needs_metadata]
    if not dims:
        return {}, {}
    bench = VBench(resolve_device(device), str(full_info), str(work_dir))
    kwargs = {} if standard else {"mode": "custom_input",
                                  "prompt_list": {name: e.prompt for name, e in
                                                  zip(links, entries)}}
    bench.evaluate(videos_path=str(video_dir), name="vbench", dimension_list=dims, **kwargs)
    results = json.loads((work_dir / "vbench_eval_results.json").read_text())
    per_video: dict[str, dict[str, float]] = {}
    averages = {}
    for dim, (average, videos) in results.items():
        averages[f"vbench_{dim}"] = float(average)
        for item in videos:
            name = links.get(Path(item["video_path"]).name)
            value = item.get("video_results")
            if name is not None and isinstance(value, (int, float, bool)):
                per_video.setdefault(name, {})[f"vbench_{dim}"] = float(value)
    return per_video, averages
