"""Metrics of toy-world videos, exact on the data (``world.py``): where the blob is, what colour, how fast.

Every function takes latents ``[B, F, 3, H, W]`` in [-1, 1] and returns one value per video ``[B]`` (or per
frame ``[B, F]``). The blob's *mass* is ``clamp((x + 1) / 2, 0)`` summed over channels.

* **position**: the circular mean of the mass along each axis (the frame is a torus), unwrapped over time;
* **net motion**: the slope of a least-squares line through the positions of a span of frames, in pixels per
  frame. Jitter around a fixed point has slope ~0, so it is not counted as motion (flicker is reported apart);
* **direction**: the largest component of that fitted velocity (left / right / up / down), against the prompt's;
* **flicker**: mean relative change of the total mass from frame to frame (0 on the data);
* **colour**: the channel holding most of the mass; **blobs per frame**: local maxima of the mass above half a
  blob's peak (1 on the data);
* **copy score**: mean correlation of a span's frames with the video's first frame (long-rollout drift).
"""
from __future__ import annotations

import math

import torch

from .world import COLOURS, DIRECTION_UNITS, DIRECTIONS, ToyPrompt


def mass(latents: torch.Tensor) -> torch.Tensor:
    """``[B, F, 3, H, W]`` -> per-channel blob mass ``[B, F, 3, H, W]`` (>= 0; 0 on the background)."""
    return ((latents.float() + 1) / 2).clamp_min(0)


def positions(latents: torch.Tensor) -> torch.Tensor:
    """Unwrapped blob centre per frame ``[B, F, 2]`` (x, y in pixels): circular means on the torus, then each
    frame-to-frame step taken as the shortest way round (steps are < half the frame)."""
    m = mass(latents).sum(2)  # [B, F, H, W]
    size_y, size_x = m.shape[-2:]

    def circular(profile: torch.Tensor, size: int) -> torch.Tensor:  # profile [..., size] -> angle [...]
        angle = torch.arange(size, dtype=profile.dtype, device=profile.device) * (2 * math.pi / size)
        return torch.atan2((profile * angle.sin()).sum(-1), (profile * angle.cos()).sum(-1)) * size / (2 * math.pi)

    xy = torch.stack([circular(m.sum(-2), size_x), circular(m.sum(-1), size_y)], dim=-1)  # [B, F, 2]
    period = torch.tensor([size_x, size_y], dtype=xy.dtype, device=xy.device)
    step = xy.diff(dim=1)
    step = (step + period / 2).remainder(period) - period / 2
    return torch.cat([xy[:, :1], xy[:, :1] + step.cumsum(1)], dim=1)


def fitted_velocity(xy: torch.Tensor) -> torch.Tensor:
    """The least-squares velocity of positions ``[B, F, 2]`` (``positions()``): ``[B, 2]`` pixels per frame."""
    t = torch.arange(xy.shape[1], dtype=xy.dtype, device=xy.device)
    t = t - t.mean()
    return ((xy - xy.mean(1, keepdim=True)) * t[None, :, None]).sum(1) / t.pow(2).sum()


def net_motion(latents: torch.Tensor, span: int | None = None) -> torch.Tensor:
    """Net speed ``[B]`` in pixels per frame: the slope of a line fit to the positions, averaged over
    consecutive spans of ``span`` frames (default: the whole video as one span)."""
    xy = positions(latents)
    frames = xy.shape[1]
    span = frames if span is None else span
    if span < 2 or span > frames:
        raise ValueError(f"span {span} must be in [2, {frames}] frames")
    speeds = [fitted_velocity(xy[:, start:start + span]).norm(dim=-1) for start in range(0, frames - span + 1, span)]
    return torch.stack(speeds, 1).mean(1)


def velocity(latents: torch.Tensor) -> torch.Tensor:
    """The fitted velocity ``[B, 2]`` (dx, dy in pixels per frame; y grows downwards) over the whole video."""
    return fitted_velocity(positions(latents))


def direction_index(latents: torch.Tensor) -> torch.Tensor:
    """Index into ``DIRECTIONS`` of the largest component of the fitted velocity ``[B]``."""
    units = torch.tensor([DIRECTION_UNITS[d] for d in DIRECTIONS], dtype=torch.float32, device=latents.device)
    return (velocity(latents).float() @ units.T).argmax(1)


def direction_correct(latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1.0 where the blob moves in the prompt's direction (the fitted velocity's largest component), else 0 ``[B]``.
    Meaningful for moving clips only: the caller picks them (fast prompts, or clips whose net motion is fast)."""
    want = torch.tensor([DIRECTIONS.index(ToyPrompt.parse(p).direction) for p in prompts], device=latents.device)
    return (direction_index(latents) == want).float()


def flicker(latents: torch.Tensor) -> torch.Tensor:
    """Mean relative frame-to-frame change of the total blob mass ``[B]``."""
    total = mass(latents).flatten(2).sum(-1)  # [B, F]
    return ((total.diff(dim=1).abs()) / total.mean(1, keepdim=True).clamp_min(1e-6)).mean(1)


def colour_index(latents: torch.Tensor) -> torch.Tensor:
    """Channel holding most of the mass, per frame ``[B, F]``."""
    return mass(latents).sum((-1, -2)).argmax(-1)


def colour_accuracy(latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fraction of frames whose colour is the prompt's ``[B]``."""
    want = torch.tensor([COLOURS.index(ToyPrompt.parse(p).colour) for p in prompts], device=latents.device)
    return (colour_index(latents) == want[:, None]).float().mean(1)


def blobs_per_frame(latents: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean number of blobs per frame ``[B]``: local maxima (3x3, on the torus) of the mass above ``threshold``
    (half the data's unit peak)."""
    m = mass(latents).sum(2)  # [B, F, H, W]
    padded = torch.nn.functional.pad(m.flatten(0, 1)[:, None], (1, 1, 1, 1), mode="circular")
    peak = torch.nn.functional.max_pool2d(padded, 3, stride=1).view_as(m)
    return ((m >= peak) & (m > threshold)).flatten(2).sum(-1).float().mean(1)


def copy_score(latents: torch.Tensor, frames: slice) -> torch.Tensor:
    """Mean Pearson correlation of the frames in ``frames`` with the video's first frame ``[B]``."""
    flat = latents.float().flatten(2)
    flat = flat - flat.mean(-1, keepdim=True)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (flat[:, frames] * flat[:, :1]).sum(-1).mean(1)


def summary(latents: torch.Tensor, prompts: list[str], span: int | None = None) -> dict[str, torch.Tensor]:
    """Every per-video metric at once ``{name: [B]}``."""
    return {"net_motion": net_motion(latents, span), "flicker": flicker(latents),
            "colour_accuracy": colour_accuracy(latents, prompts), "blobs_per_frame": blobs_per_frame(latents),
            "std": latents.float().flatten(1).std(1)}
