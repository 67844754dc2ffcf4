"""Speed of the weight-free metrics on a synthetic video (``python scripts/evaluate.py --benchmark``).

The video is an 81-frame 832x480 pan over a smooth random texture with a square moving across it, written to an
H.264 mp4 and decoded back, so decoding is measured on a real file. Run it on one core for the documented
figure: ``OMP_NUM_THREADS=1 python scripts/evaluate.py --benchmark --threads 1``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from .metrics import MetricConfig, _flow_pairs, _frame_features, score_frames, vbench_frame_stride
from ..video_io import read_video

__all__ = ["synthetic_video", "run_benchmark"]


def synthetic_video(num_frames: int = 81, height: int = 480, width: int = 832, pan_px: float = 2.0,
                    seed: int = 0) -> np.ndarray:
    """uint8 ``[N, H, W, 3]``: a smooth texture panning ``pan_px`` per frame with a square moving over it."""
    rng = np.random.default_rng(seed)
    canvas = cv2.GaussianBlur(rng.integers(0, 256, (height, width + int(pan_px * num_frames) + 1, 3),
                                           dtype=np.uint8), (0, 0), 3)
    square = cv2.GaussianBlur(rng.integers(0, 256, (height // 4, height // 4, 3), dtype=np.uint8), (0, 0), 1.5)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        x0 = int(round(pan_px * t))
        frames[t] = canvas[:, x0:x0 + width]
        sx = int((width - square.shape[1]) * t / max(1, num_frames - 1))
        frames[t, height // 3:height // 3 + square.shape[0], sx:sx + square.shape[1]] = square
    return frames


def run_benchmark(num_frames: int = 81, height: int = 480, width: int = 832, fps: float = 16.0, repeats: int = 3,
                  threads: int | None = 1) -> dict[str, float]:
    """Median seconds over ``repeats`` for: decoding the mp4, the per-frame pass, the optical flow, and the whole
    ``score_frames`` call (the weight-free metrics). ``threads`` sets OpenCV's thread count (None: OpenCV's
    default)."""
    from reward_forcing.video_io import Mp4Writer

    if threads is not None:
        cv2.setNumThreads(threads)
    cfg = MetricConfig().validate()
    frames = synthetic_video(num_frames, height, width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "benchmark.mp4"
        with Mp4Writer(path, fps=fps) as writer:
            writer.write(frames)
        timings: dict[str, list[float]] = {"decode_s": [], "frame_pass_s": [], "flow_s": [], "metrics_s": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            decoded, read_fps = read_video(path)
            t1 = time.perf_counter()
            feats = _frame_features(decoded, cfg, vbench_frame_stride(read_fps))
            t2 = time.perf_counter()
            _flow_pairs(feats["flow_gray"], height, width)
            t3 = time.perf_counter()
            score_frames(decoded, read_fps, cfg)
            t4 = time.perf_counter()
            for key, value in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timings[key].append(value)
    result = {key: statistics.median(values) for key, values in timings.items()}
    result.update(frames=num_frames, height=height, width=width, opencv_threads=cv2.getNumThreads())
    return result
