"""Finding, naming and decoding the videos to score.

A video's prompt comes from, in order:

1. our file names ``{index:04d}-{slug}-s{sample}.mp4`` (``reward_forcing.video_io.video_filename``) and a
   prompt file: line ``index`` of the file (and of the extended file, which is the text the model saw);
2. any other names together with a prompt file that has exactly one prompt per video: the prompts in file
   order against the videos in name order;
3. the file name itself: VBench names its videos ``{prompt}-{sample}.mp4``, so the stem minus a ``-N`` suffix
   is the prompt (for our names without a prompt file, the slug with hyphens read as spaces).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from reward_forcing.data import read_prompts
from reward_forcing.video_io import VideoReadError, read_video

__all__ = ["VideoEntry", "VideoReadError", "list_videos", "parse_video_name", "describe_videos", "read_video",
           "thumbnail_strip", "encode_png"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4",)
_OUR_NAME = re.compile(r"^(?P<index>\d{4,})-(?P<slug>.*)-s(?P<sample>\d+)$")
_VBENCH_NAME = re.compile(r"^(?P<prompt>.+)-(?P<sample>\d+)$")


@dataclass(frozen=True)
class VideoEntry:
    """One video to score and what is known about it before decoding."""

    path: Path
    prompt: str  # the short prompt that names the video
    conditioning: str  # the text the model was conditioned on (the extended prompt when known)
    prompt_index: int | None  # line of the prompt file, when known
    sample: int
    prompt_source: str  # "prompt file" | "file order" | "file name"

    @property
    def name(self) -> str:
        return self.path.name


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The mp4 files directly inside ``folder`` (hidden and temporary files skipped), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"video folder '{folder}' {what}")
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".") and not p.is_dir())
    if not paths:
        raise FileNotFoundError(f"no .mp4 files in '{folder}'")
    return paths


def parse_video_name(stem: str) -> tuple[int | None, str, int]:
    """``(prompt index or None, prompt guess, sample)`` from a file stem (see the module docstring)."""
    m = _OUR_NAME.match(stem)
    if m:
        return int(m["index"]), m["slug"].replace("-", " "), int(m["sample"])
    m = _VBENCH_NAME.match(stem)
    if m:
        return None, m["prompt"], int(m["sample"])
    return None, stem, 0


def describe_videos(paths: list[Path], prompt_file: str | os.PathLike | None = None,
                    extended_file: str | os.PathLike | None = None) -> list[VideoEntry]:
    """Attach prompts to video files. Raises FileNotFoundError / ValueError for a bad prompt file."""
    by_index, ordered = {}, []
    if prompt_file is not None:
        prompts = read_prompts(prompt_file, extended_file)
        by_index = {p.index: p for p in prompts}
        ordered = prompts
    elif extended_file is not None:
        raise ValueError("--extended_prompts needs --prompts (the short prompts name the videos)")
    parsed = [parse_video_name(p.stem) for p in paths]
    foreign = sum(index is None for index, _, _ in parsed)
    use_order = bool(ordered) and foreign == len(paths) and len(ordered) == len(paths)
    if ordered and foreign and not use_order:
        log.warning("%d video(s) are not named {index:04d}-...-s{sample}.mp4 and the prompt file does not have one "
                    "prompt per video (%d prompts, %d videos): their prompts are read from their file names",
                    foreign, len(ordered), len(paths))
    entries = []
    for i, (path, (index, guess, sample)) in enumerate(zip(paths, parsed)):
        prompt = by_index.get(index) if index is not None else (ordered[i] if use_order else None)
        if index is not None and by_index and prompt is None:
            log.warning("%s: line %d is not a prompt in %s; using the name", path.name, index, prompt_file)
        if prompt is not None:
            entries.append(VideoEntry(path, prompt.text, prompt.conditioning, prompt.index, sample,
                                      "prompt file" if index is not None else "file order"))
        else:
            entries.append(VideoEntry(path, guess, guess, index, sample, "file name"))
    return entries


def thumbnail_strip(frames: np.ndarray, count: int = 8, height: int = 72) -> np.ndarray:
    """``count`` frames evenly spread over the video, each ``height`` pixels high, side by side (uint8 RGB)."""
    n, h, w = frames.shape[:3]
    width = max(1, round(w * height / h))
    picks = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    tiles = [cv2.resize(frames[i], (width, height), interpolation=cv2.INTER_AREA) for i in picks]
    gap = np.full((height, 2, 3), 255, dtype=np.uint8)
    return np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB image."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
