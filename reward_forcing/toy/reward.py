"""The toy world's reward: net motion, in units of the data's fast speed (1.0 = a fast clip, 0 = static).

It has the interface the trainer calls on every reward (``score(pixels, prompts) -> {name: [B]}``, see
``training/trainer.py``); Re-DMD weights sample i by ``exp(beta * score[reward_key]_i)``. Scaling by the fast
speed fixes the weights' range: with beta = 3 a fast sample weighs ``e^3 ~ 20`` times a static one, so the
weighting matters, whereas raw pixels per frame (0.75) with beta = 2 would give only ``e^1.5``.
"""
from __future__ import annotations

import torch

from . import metrics
from .world import ToyWorld


class ToyMotionReward(torch.nn.Module):
    def __init__(self, world: ToyWorld = ToyWorld(), span: int | None = None):
        super().__init__()
        self.world, self.span = world, span

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """pixels: the decoded video ``[B, F, 3, H, W]`` (the latents: the toy decoder is the identity)."""
        return {"motion": metrics.net_motion(pixels, self.span) / self.world.fast_speed}
