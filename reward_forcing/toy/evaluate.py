"""Evaluating models on the toy world: fixed evaluation sets, per-group metrics, the acceptance gates.

Everything here samples through the project's own code - the teacher through ``sampling.sample_teacher``, a
student through ``StreamingPipeline.generate`` (the one block loop) - and measures with ``metrics.py``. An
evaluation set is a list of prompts with one fixed noise seed each, so two models are compared on the very
same noise (paired). The gates and their thresholds are the ones docs/toy_world.md lists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..models.wan import WanModel
from ..pipeline import StreamingPipeline
from ..sampling import sample_teacher
from . import metrics
from .world import COLOURS, DIRECTIONS, ToyPrompt, ToyWorld

WORLD = ToyWorld()
FAST_THRESHOLD = WORLD.fast_speed / 2  # a sample is "fast" when its net motion is above half the fast speed


def eval_prompts(speeds: tuple[str, ...] = ("static", "fast"), repeats: int = 4) -> list[str]:
    """Every colour x direction for each speed, ``repeats`` times (``repeats * 12`` prompts per speed)."""
    return [f"{c} {s} {d}" for _ in range(repeats) for s in speeds for c in COLOURS for d in DIRECTIONS]


def noise_for(count: int, shape: tuple[int, ...], seed: int = 1234) -> torch.Tensor:
    """The evaluation noise ``[count, *shape]``: sample i always gets the same draw."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])


# ------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_teacher_videos(teacher: WanModel, text_encoder, prompts: list[str], *, num_frames: int = 9,
                          steps: int = 32, shift: float = 5.0, guidance_scale: float = 3.0, batch_size: int = 48,
                          seed: int = 1234) -> torch.Tensor:
    """Teacher samples ``[B, F, 3, H, W]`` for ``prompts`` on the evaluation noise."""
    noise = noise_for(len(prompts), (num_frames, WORLD.channels, WORLD.size, WORLD.size), seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        x0, _ = sample_teacher(teacher, noise[start:start + len(batch)], text_encoder(batch),
                               text_encoder.encode_negative("", len(batch)), num_steps=steps, shift=shift,
                               guidance_scale=guidance_scale)
        out.append(x0.float())
    return torch.cat(out)


@torch.no_grad()
def sample_student_videos(pipe: StreamingPipeline, prompts: list[str], *, num_frames: int = 9,
                          sink_policy: str | None = None, seed: int = 1234, batch_size: int = 48) -> torch.Tensor:
    """Student samples ``[B, F, 3, H, W]`` streamed block by block (``sink_policy`` overrides the generator's)."""
    generator = pipe.generator
    original = generator.causal
    if sink_policy is not None:
        generator.causal = original.with_policy(sink_policy)
    try:
        noise = noise_for(len(prompts), (num_frames, WORLD.channels, WORLD.size, WORLD.size), seed)
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            _, latents = pipe.generate(batch, num_frames=num_frames, height=WORLD.size, width=WORLD.size,
                                       noise=noise[start:start + len(batch)], decode=False)
            out.append(latents.float())
        return torch.cat(out)
    finally:
        generator.causal = original


# ------------------------------------------------------------------------------------------- metrics
@dataclass
class GroupMetrics:
    """Means over one speed group of prompts."""

    count: int
    net_motion: float
    flicker: float
    colour_accuracy: float
    blobs_per_frame: float
    fast_fraction: float
    # of the moving clips (fast prompts, and `any` clips that came out fast): moving in the prompted direction;
    # None when the group has none (static prompts)
    direction_accuracy: float | None


def group_metrics(videos: torch.Tensor, prompts: list[str]) -> dict[str, GroupMetrics]:
    """Per speed (``static`` / ``fast`` / ``any``) and ``all``."""
    values = metrics.summary(videos, prompts)
    motion = values["net_motion"]
    out = {}
    speeds = [ToyPrompt.parse(p).speed for p in prompts]
    correct = metrics.direction_correct(videos, prompts)
    moving = torch.tensor([s == "fast" for s in speeds]) | (torch.tensor([s == "any" for s in speeds])
                                                            & (motion > FAST_THRESHOLD))
    for group in ("static", "fast", "any", "all"):
        mask = torch.tensor([group in ("all", s) for s in speeds])
        if not mask.any():
            continue
        out[group] = GroupMetrics(
            count=int(mask.sum()), net_motion=motion[mask].mean().item(), flicker=values["flicker"][mask].mean().item(),
            colour_accuracy=values["colour_accuracy"][mask].mean().item(),
            blobs_per_frame=values["blobs_per_frame"][mask].mean().item(),
            fast_fraction=(motion[mask] > FAST_THRESHOLD).float().mean().item(),
            direction_accuracy=correct[mask & moving].mean().item() if (mask & moving).any() else None)
    return out


def speed_gap(groups: dict[str, GroupMetrics]) -> float:
    return groups["fast"].net_motion - groups["static"].net_motion


def as_dict(groups: dict[str, GroupMetrics]) -> dict[str, dict]:
    return {name: dataclasses.asdict(g) for name, g in groups.items()}


def bootstrap_mean_ci(values: torch.Tensor, *, samples: int = 10000, level: float = 0.95, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap confidence interval."""
    rng = torch.Generator().manual_seed(seed)
    values = values.double().flatten()
    idx = torch.randint(len(values), (samples, len(values)), generator=rng)
    means = values[idx].mean(1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return values.mean().item(), low.item(), high.item()


# ---------------------------------------------------------------------------------------- long rollout
def rollout_drift(videos: torch.Tensor, prompts: list[str], window: int = 21) -> dict[str, float]:
    """First vs last ``window`` frames of long videos: std, net motion, copy score; and colour over all."""
    first, last = slice(0, window), slice(videos.shape[1] - window, videos.shape[1])
    std_first, std_last = videos[:, first].std().item(), videos[:, last].std().item()
    return {
        "std_first": std_first, "std_last": std_last, "std_ratio": std_last / max(std_first, 1e-12),
        "colour_accuracy": metrics.colour_accuracy(videos, prompts).mean().item(),
        "motion_first": metrics.net_motion(videos[:, first]).mean().item(),
        "motion_last": metrics.net_motion(videos[:, last]).mean().item(),
        "copy_first": metrics.copy_score(videos, slice(1, window)).mean().item(),
        "copy_last": metrics.copy_score(videos, last).mean().item(),
    }


def windowed(videos: torch.Tensor, window: int = 9, stride: int = 3) -> dict[str, list[float]]:
    """Net motion and copy score of sliding windows (for the plot of motion / copy over time)."""
    starts = list(range(0, videos.shape[1] - window + 1, stride))
    return {"frame": [s + window // 2 for s in starts],
            "motion": [metrics.net_motion(videos[:, s:s + window]).mean().item() for s in starts],
            "copy": [metrics.copy_score(videos, slice(s, s + window)).mean().item() for s in starts]}
