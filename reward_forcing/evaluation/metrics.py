"""Weight-free video metrics: plain numpy + OpenCV, the same numbers on every machine.

``score_frames(frames, fps, MetricConfig())`` makes one pass over the decoded uint8 frames, keeps small
per-frame features (frame differences, downsampled grey frames, 32x32 thumbnails, colour statistics) and
derives every metric from them. It returns one record per video and one per fixed time window. The formulas
are in docs/evaluation.md; in short:

* temporal flicker: VBench's score ``(255 - mean_t MAE(f_t, f_t+1)) / 255`` (1 = no change at all);
* motion: the same mean frame difference in grey levels, and Farneback optical-flow magnitude in pixels
  per frame (mean over the frame, and mean of the fastest 5 % of pixels);
* dynamic: VBench's dynamic-degree rule applied to Farneback flow instead of RAFT;
* block-seam ratio: frame difference across the student's block boundaries over the difference inside blocks;
* first-frame copy: best SSIM of a later frame's 32x32 thumbnail against the first block's thumbnails;
* drift: luma, contrast, saturation, sharpness and colour histogram of each window against the first window.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "MetricConfig", "VideoScores", "score_frames", "block_boundaries", "time_windows", "vbench_frame_stride",
    "dynamic_rule", "ssim_tiles", "hellinger", "WINDOW_METRICS", "VIDEO_METRICS",
]

# VBench's dynamic-degree rule (vbench/dynamic_degree.py): frames are taken at about 8 fps; a frame pair counts
# as moving when the mean of its largest 5 % flow magnitudes exceeds 6 px at a 256-pixel short side (scaled
# with the short side, and by 8/fps when the video is slower than 8 fps); a video is dynamic when at least
# 4 pairs per 16 sampled frames move.
VBENCH_FLOW_FPS = 8.0
VBENCH_TOP_FRACTION = 0.05
VBENCH_THRESHOLD_PX = 6.0
VBENCH_REFERENCE_SIDE = 256.0
VBENCH_PAIRS_PER_16_FRAMES = 4

# Farneback parameters: OpenCV's commonly used setting (3 pyramid levels of scale 0.5, 15 px window).
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# SSIM constants for 8-bit data (Wang et al. 2004: K1 = 0.01, K2 = 0.03, L = 255).
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
_SSIM_TILE = 8
# Keeps the seam ratio finite on a static video (0 / 0 -> 1); a tenth of a grey level.
_SEAM_EPS = 0.1

# Columns of the per-window and per-video records, in report order (model-based scores are appended).
WINDOW_METRICS = ("frame_diff", "flow_mean", "temporal_flickering", "seam_ratio", "first_frame_copy",
                  "luma", "contrast", "saturation", "sharpness",
                  "luma_drift", "contrast_drift", "saturation_drift", "sharpness_drift", "hist_drift")
VIDEO_METRICS = ("temporal_flickering", "frame_diff", "flow_mean", "flow_top5", "dynamic", "seam_ratio",
                 "first_frame_copy", "first_frame_copy_end", "luma_drift", "contrast_drift", "saturation_drift",
                 "sharpness_drift", "hist_drift", "hist_drift_max")


@dataclass
class MetricConfig:
    """Settings of the weight-free metrics. The defaults match 16-fps videos of the Reward Forcing student.

    first_block_frames / block_frames: the student's chunk layout in decoded frames. A block of 3 latent frames
    decodes to 1 + 4*2 = 9 frames for the first block and 12 for every later one, so seams sit before frames
    9, 21, 33, ...
    """

    first_block_frames: int = 9
    block_frames: int = 12
    window_frames: int = 16  # drift / per-window records: 1 s at 16 fps; a tail shorter than half merges
    flow_short_side: int = 256  # Farneback runs on frames downsampled to this short side (0 = native size)
    stats_short_side: int = 240  # colour statistics and sharpness on this short side (0 = native size)
    copy_reference_frames: int = 0  # frames a later frame is compared with for copying; 0 = first_block_frames
    copy_size: int = 32  # thumbnail side for the first-frame-copy similarity
    histogram_bins: int = 8  # per RGB channel (8 -> 512 colour bins)

    def validate(self) -> MetricConfig:
        for name in ("first_block_frames", "block_frames", "window_frames", "copy_size", "histogram_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"metric setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("flow_short_side", "stats_short_side", "copy_reference_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"metric setting {name} must be >= 0, got {getattr(self, name)}")
        if self.window_frames < 2:
            raise ValueError(f"window_frames must be >= 2 (a window needs a frame pair), got {self.window_frames}")
        if self.copy_size % _SSIM_TILE:
            raise ValueError(f"copy_size must be a multiple of {_SSIM_TILE}, got {self.copy_size}")
        if not 2 <= self.histogram_bins <= 64:
            raise ValueError(f"histogram_bins must be in 2..64, got {self.histogram_bins}")
        return self

    @property
    def copy_references(self) -> int:
        return self.copy_reference_frames or self.first_block_frames

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VideoScores:
    """Metrics of one video: ``video`` (name -> number) and ``windows`` (one dict per time window)."""

    video: dict[str, float]
    windows: list[dict[str, float]]


# --------------------------------------------------------------------------------------------------
# Geometry of a video: blocks, windows, sampling
# --------------------------------------------------------------------------------------------------
def block_boundaries(num_frames: int, first_block_frames: int, block_frames: int) -> np.ndarray:
    """Frame indices t whose transition (t-1 -> t) crosses a block boundary: first, first + block, ..."""
    return np.arange(first_block_frames, num_frames, block_frames, dtype=np.int64)


def time_windows(num_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` windows of ``window_frames``; a tail shorter than half a window joins the
    last window (so every frame belongs to exactly one window and no window is a sliver)."""
    if num_frames <= window_frames:
        return [(0, num_frames)]
    bounds = list(range(0, num_frames, window_frames)) + [num_frames]
    windows = list(zip(bounds[:-1], bounds[1:]))
    if len(windows) > 1 and windows[-1][1] - windows[-1][0] < window_frames / 2:
        windows[-2:] = [(windows[-2][0], num_frames)]
    return windows


def vbench_frame_stride(fps: float) -> int:
    """Frame step VBench uses to look at a video at about 8 fps: ``max(1, round(fps / 8))`` (2 at 16 fps)."""
    return max(1, round(fps / VBENCH_FLOW_FPS))


def dynamic_rule(height: int, width: int, fps: float, num_sampled_frames: int) -> tuple[float, int]:
    """VBench's (threshold in pixels, number of moving pairs needed) for a video of this size and frame rate.

    threshold = max(1, 8 / fps) * 6 * min(H, W) / 256 (11.25 px at 832x480, 16 fps);
    needed = round(4 * n / 16) for n frames sampled at ~8 fps (10 for 81 frames). VBench's own rule lets a clip
    of 2 sampled frames count as dynamic without any motion (round(0.5) = 0); here at least one pair must move.
    """
    factor = max(1.0, VBENCH_FLOW_FPS / fps)
    threshold = factor * VBENCH_THRESHOLD_PX * min(height, width) / VBENCH_REFERENCE_SIDE
    needed = max(1, round(VBENCH_PAIRS_PER_16_FRAMES * num_sampled_frames / 16.0))
    return threshold, needed


def _resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if short_side <= 0 or min(h, w) <= short_side:
        return frame
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------------
# Similarities
# --------------------------------------------------------------------------------------------------
def _tile_stats(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N, S, S]`` thumbnails -> zero-mean tile pixels ``[N, T, 64]``, tile means and variances ``[N, T]``."""
    n, s, _ = thumbs.shape
    k = s // _SSIM_TILE
    tiles = thumbs.reshape(n, k, _SSIM_TILE, k, _SSIM_TILE).transpose(0, 1, 3, 2, 4).reshape(n, k * k, -1)
    mean = tiles.mean(axis=2)
    centred = tiles - mean[..., None]
    var = (centred ** 2).mean(axis=2)
    return centred, mean, var


def ssim_tiles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of every thumbnail in ``a`` ``[M, S, S]`` against every one in ``b`` ``[K, S, S]`` -> ``[M, K]``.

    SSIM is evaluated on non-overlapping 8x8 tiles and averaged over tiles; identical thumbnails give 1,
    unrelated textures about 0.
    """
    ca, ma, va = _tile_stats(a.astype(np.float64))
    cb, mb, vb = _tile_stats(b.astype(np.float64))
    cov = np.einsum("mtp,ktp->mkt", ca, cb) / ca.shape[2]
    num = (2 * ma[:, None] * mb[None] + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (ma[:, None] ** 2 + mb[None] ** 2 + _SSIM_C1) * (va[:, None] + vb[None] + _SSIM_C2)
    return (num / den).mean(axis=2)


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two histograms (normalised here): 0 = same colours, 1 = disjoint."""
    p = p / max(p.sum(), 1e-12)
    q = q / max(q.sum(), 1e-12)
    return float(math.sqrt(max(0.0, 1.0 - np.sqrt(p * q).sum())))


# --------------------------------------------------------------------------------------------------
# The pass over the frames
# --------------------------------------------------------------------------------------------------
def _frame_features(frames: np.ndarray, cfg: MetricConfig, stride: int) -> dict[str, np.ndarray]:
    """Everything the metrics need, from one pass over the frames (no frame is converted twice)."""
    n = len(frames)
    bins = cfg.histogram_bins
    diffs = np.zeros(n, dtype=np.float64)  # diffs[t] = MAE(f_{t-1}, f_t); diffs[0] unused
    luma = np.empty(n)
    contrast = np.empty(n)
    saturation = np.empty(n)
    sharpness = np.empty(n)
    hist = np.empty((n, bins ** 3), dtype=np.float64)
    thumbs = np.empty((n, cfg.copy_size, cfg.copy_size), dtype=np.float32)
    flow_gray = {}
    shift = 8 - int(math.log2(bins)) if bins & (bins - 1) == 0 else None
    for t in range(n):
        frame = frames[t]
        if t:
            diffs[t] = sum(cv2.mean(cv2.absdiff(frame, frames[t - 1]))[:3]) / 3.0
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)  # Rec. 601 luma
        if t % stride == 0:
            flow_gray[t] = _resize_short_side(gray, cfg.flow_short_side)
        thumbs[t] = cv2.resize(gray, (cfg.copy_size, cfg.copy_size), interpolation=cv2.INTER_AREA)
        small = _resize_short_side(frame, cfg.stats_short_side)
        small_gray = _resize_short_side(gray, cfg.stats_short_side)
        mean, std = cv2.meanStdDev(small_gray)
        luma[t], contrast[t] = mean[0, 0], std[0, 0]
        saturation[t] = cv2.mean(cv2.cvtColor(small, cv2.COLOR_RGB2HSV))[1] / 255.0
        sharpness[t] = cv2.Laplacian(small_gray, cv2.CV_32F).var()
        q = (small >> shift) if shift is not None else (small.astype(np.uint16) * bins // 256).astype(np.uint8)
        index = (q[..., 0].astype(np.int32) * bins + q[..., 1]) * bins + q[..., 2]
        hist[t] = np.bincount(index.ravel(), minlength=bins ** 3)
    return dict(diffs=diffs, luma=luma, contrast=contrast, saturation=saturation, sharpness=sharpness, hist=hist,
                thumbs=thumbs, flow_gray=flow_gray)


def _flow_pairs(flow_gray: dict[int, np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """Farneback flow between consecutive sampled frames -> (first frame index, mean magnitude, mean of the
    top 5 % magnitudes) per pair, magnitudes in pixels of the original frame."""
    times = sorted(flow_gray)
    starts, means, tops = [], [], []
    for a, b in zip(times[:-1], times[1:]):
        g0, g1 = flow_gray[a], flow_gray[b]
        if np.array_equal(g0, g1):  # Farneback returns ~1e-3 px of noise on identical frames; it is exactly 0
            starts.append(a)
            means.append(0.0)
            tops.append(0.0)
            continue
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, **_FARNEBACK)
        sy, sx = height / g0.shape[0], width / g0.shape[1]  # back to original pixels
        mag = np.sqrt((flow[..., 0] * sx) ** 2 + (flow[..., 1] * sy) ** 2).ravel()
        k = max(1, int(mag.size * VBENCH_TOP_FRACTION))
        starts.append(a)
        means.append(float(mag.mean()))
        tops.append(float(np.partition(mag, mag.size - k)[mag.size - k:].mean()))
    return np.asarray(starts, dtype=np.int64), np.asarray(means), np.asarray(tops)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _seam_ratio(diffs: np.ndarray, transitions: np.ndarray, boundaries: set[int]) -> float:
    """(mean diff across boundaries + eps) / (mean diff inside blocks + eps) over the given transitions."""
    at = [diffs[t] for t in transitions if t in boundaries]
    inside = [diffs[t] for t in transitions if t not in boundaries]
    if not at or not inside:
        return float("nan")
    return (float(np.mean(at)) + _SEAM_EPS) / (float(np.mean(inside)) + _SEAM_EPS)


def score_frames(frames: np.ndarray, fps: float, cfg: MetricConfig | None = None) -> VideoScores:
    """All weight-free metrics of one video. ``frames``: uint8 ``[N, H, W, 3]`` RGB, N >= 2; ``fps`` > 0."""
    cfg = (cfg or MetricConfig()).validate()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    n, height, width = frames.shape[:3]
    if n < 2:
        raise ValueError(f"a video needs at least 2 frames to measure change over time, got {n}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = np.ascontiguousarray(frames)
    stride = vbench_frame_stride(fps)
    feats = _frame_features(frames, cfg, stride)
    diffs = feats["diffs"]

    # Motion and dynamic degree (flow on frames ~8 fps apart, reported per original frame).
    pair_start, pair_mean, pair_top = _flow_pairs(feats["flow_gray"], height, width)
    n_sampled = len(feats["flow_gray"])
    threshold, needed = dynamic_rule(height, width, fps, n_sampled)
    moving = int((pair_top > threshold).sum())

    # Block seams.
    boundaries = set(block_boundaries(n, cfg.first_block_frames, cfg.block_frames).tolist())
    all_transitions = np.arange(1, n)

    # First-frame copy: each frame after the reference frames against all reference frames.
    k = min(cfg.copy_references, n - 1)
    copy = np.full(n, np.nan)
    copy[k:] = ssim_tiles(feats["thumbs"][k:], feats["thumbs"][:k]).max(axis=1)

    # Windows and drift against the first window.
    windows = time_windows(n, cfg.window_frames)
    records = []
    first = None
    for w, (a, b) in enumerate(windows):
        transitions = np.arange(max(a, 1), b)
        in_window = (pair_start >= a) & (pair_start < b)
        stats = dict(luma=float(feats["luma"][a:b].mean()), contrast=float(feats["contrast"][a:b].mean()),
                     saturation=float(feats["saturation"][a:b].mean()),
                     sharpness=float(feats["sharpness"][a:b].mean()))
        hist = feats["hist"][a:b].sum(axis=0)
        if first is None:
            first = dict(stats, hist=hist)
        frame_diff = float(diffs[transitions].mean()) if transitions.size else float("nan")
        records.append({
            "window": w, "start_frame": a, "end_frame": b, "t_start": a / fps, "t_end": b / fps,
            "frame_diff": frame_diff,
            "flow_mean": float(pair_mean[in_window].mean() / stride) if in_window.any() else float("nan"),
            "temporal_flickering": (255.0 - frame_diff) / 255.0,
            "seam_ratio": _seam_ratio(diffs, transitions, boundaries),
            "first_frame_copy": _nanmean(copy[a:b]),
            **stats,
            "luma_drift": stats["luma"] - first["luma"],
            "contrast_drift": stats["contrast"] - first["contrast"],
            "saturation_drift": stats["saturation"] - first["saturation"],
            "sharpness_drift": math.log((stats["sharpness"] + 1e-6) / (first["sharpness"] + 1e-6)),
            "hist_drift": hellinger(hist, first["hist"]),
        })

    frame_diff = float(diffs[1:].mean())
    last = records[-1]
    video = {
        "temporal_flickering": (255.0 - frame_diff) / 255.0,
        "frame_diff": frame_diff,
        "flow_mean": float(pair_mean.mean() / stride) if pair_mean.size else float("nan"),
        "flow_top5": float(pair_top.mean() / stride) if pair_top.size else float("nan"),
        "dynamic": float(moving >= needed) if pair_top.size else float("nan"),
        "dynamic_moving_pairs": moving,
        "dynamic_pairs_needed": needed,
        "dynamic_threshold_px": threshold,
        "seam_ratio": _seam_ratio(diffs, all_transitions, boundaries),
        "first_frame_copy": _nanmean(copy),
        "first_frame_copy_end": last["first_frame_copy"],
        "luma_drift": last["luma_drift"],
        "contrast_drift": last["contrast_drift"],
        "saturation_drift": last["saturation_drift"],
        "sharpness_drift": last["sharpness_drift"],
        "hist_drift": last["hist_drift"],
        "hist_drift_max": max(r["hist_drift"] for r in records),
    }
    return VideoScores(video=video, windows=records)
