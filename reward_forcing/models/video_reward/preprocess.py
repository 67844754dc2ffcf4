"""VideoReward preprocessing in plain torch: videos -> Qwen2-VL video patches.

No torchvision, qwen-vl-utils or transformers video processor (all three import torchvision): frame sampling,
Qwen2-VL's ``smart_resize``, pixel range, CLIP normalisation, temporal padding and the patch layout, tested
equal to transformers' ``Qwen2VLImageProcessorPil``.

Input conventions (the project's): float ``[T, 3, H, W]`` in [-1, 1] (decoded pixels), or uint8
``[T, H, W, 3]`` (frames read from a file, as ``reward_forcing.video_io.read_video`` returns them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CLIP_MEAN", "CLIP_STD", "VideoPreprocessConfig", "smart_resize", "sample_frame_indices",
           "patchify_video", "preprocess_video"]

# Qwen2-VL image/video processor constants (OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VideoPreprocessConfig:
    """How a video becomes Qwen2-VL video patches.

    Defaults follow VideoAlign's training data path (qwen-vl-utils ``fetch_video`` at 2 fps, at most
    ``max_pixels`` per frame, pixel values in [0, 1] before CLIP normalisation). The two ``reference``
    switches reproduce Reward Forcing's ``reward_from_frames`` instead (docs/differences.md, training rows 3-4).
    """

    fps: float = 2.0  # frames per second fed to the model (VideoAlign data_config.fps)
    source_fps: float = 16.0  # frame rate of the input videos (Wan2.1: 16 fps)
    sample_all_frames: bool = False  # True: feed every frame, as the reference does
    min_frames: int = 4  # qwen-vl-utils FPS_MIN_FRAMES
    max_frames: int = 768  # qwen-vl-utils FPS_MAX_FRAMES
    max_pixels: int = 200704  # VideoAlign data_config.max_frame_pixels (256 * 28 * 28)
    min_pixels: int = 128 * 28 * 28  # qwen-vl-utils VIDEO_MIN_PIXELS; only matters below ~317x317
    reference_pixel_range: bool = False  # True: the reference's [-1, 1] instead of [0, 1]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (28 = patch 14 x merge 2)."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 200704) -> tuple[int, int]:
    """Qwen2-VL's target frame size: sides multiples of ``factor``, area within the pixel bounds.

    Each side is rounded to the nearest multiple of ``factor``; if the area then exceeds
    ``max_pixels`` both sides are scaled by the same factor and rounded *down*, if it falls below
    ``min_pixels`` they are scaled up and rounded *up*. 480x832 under 200704 gives 336x588.
    """
    if min(height, width) <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200, which Qwen2-VL does not accept")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def sample_frame_indices(num_frames: int, cfg: VideoPreprocessConfig = VideoPreprocessConfig()) -> torch.Tensor:
    """Indices of the frames fed to the model (uniform in time, like VideoAlign's training data).

    ``num_frames / source_fps * fps`` frames, clamped to ``[min_frames, min(max_frames, num_frames)]``
    and rounded down to a multiple of the temporal patch size, spread uniformly (rounded linspace) over
    the clip. 81 frames at 16 fps -> 10 frames at 2 fps. With ``sample_all_frames`` every index is
    returned (the reference); temporal padding to an even count happens in ``patchify_video``.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    k = cfg.temporal_patch_size
    if cfg.sample_all_frames or num_frames < k:
        return torch.arange(num_frames)
    lo = math.ceil(cfg.min_frames / k) * k
    hi = max(k, math.floor(min(cfg.max_frames, num_frames) / k) * k)
    n = num_frames / cfg.source_fps * cfg.fps
    n = min(max(n, lo), hi, num_frames)
    n = max(k, math.floor(n / k) * k)
    return torch.linspace(0, num_frames - 1, n).round().long()


def patchify_video(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut normalised frames ``[T, C, H, W]`` into Qwen2-VL's flat patch rows.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Returns
    ``([grid_t * grid_h * grid_w, C * tps * patch * patch], (grid_t, grid_h, grid_w))``. Rows are
    ordered (t, h-block, w-block, h-in-block, w-in-block) so that each run of ``merge_size**2``
    consecutive rows is one 2x2 group that the vision tower's PatchMerger fuses into one token; each
    row is (channel, time, y, x) -- the layout of transformers' Qwen2-VL processors.
    """
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, C, H, W], got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {unit}; resize with smart_resize first")
    if t % temporal_patch_size:
        pad = temporal_patch_size - t % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, c, h, w)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # (gt, tps, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tps, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def preprocess_video(video: torch.Tensor, cfg: VideoPreprocessConfig = VideoPreprocessConfig()
                     ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One video -> (patches ``[N, 1176]`` float32, grid ``(t, h, w)``).

    ``video``: float ``[T, 3, H, W]`` in [-1, 1], or uint8 ``[T, H, W, 3]``. Steps: sample frames
    (``sample_frame_indices``); map to the pixel range (default [0, 1]: ``(x + 1) / 2`` or ``x / 255``; reference
    switch: [-1, 1]); resize every frame to the ``smart_resize`` size with bicubic antialiased interpolation (what
    torchvision's tensor resize runs, which VideoAlign used); CLIP mean/std normalisation; ``patchify_video``.
    """
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {tuple(video.shape)}")
        video = video.permute(0, 3, 1, 2)
    elif video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a float video [T, 3, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    frames = video[sample_frame_indices(video.shape[0], cfg).to(video.device)].detach()
    if frames.dtype == torch.uint8:
        frames = frames.float() / 255.0
        if cfg.reference_pixel_range:
            frames = frames * 2.0 - 1.0
    else:
        frames = frames.float().clamp(-1.0, 1.0)
        if not cfg.reference_pixel_range:
            frames = (frames + 1.0) * 0.5
    h, w = frames.shape[-2:]
    th, tw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (th, tw) != (h, w):
        frames = F.interpolate(frames, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
        if not cfg.reference_pixel_range:
            # VideoAlign resized uint8 frames (rounded and clamped); keep the overshoot of bicubic out.
            frames = frames.clamp(0.0, 1.0)
    mean = torch.tensor(cfg.image_mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    frames = (frames - mean) / std
    return patchify_video(frames, cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)
