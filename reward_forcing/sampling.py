"""Sampling the bidirectional teacher: N-step Euler on the shifted flow-matching grid, with CFG.

``x_{sigma'} = x_sigma + (sigma' - sigma) v``, ``v = v_uncond + g (v_cond - v_uncond)``, from sigma = 1 (pure
noise) to 0, over the grid ``sigma_i = shift s_i / (1 + (shift - 1) s_i)``, ``s_i = 1 - i / N`` (the grid of
``schedule.py`` with N points instead of 1000). Timesteps the caller wants to record (the student's few-step
timesteps, for ODE pairs) are inserted into the grid, so their states are exact Euler states, not interpolated.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .models.wan import WanModel
from .schedule import shifted


def euler_sigmas(num_steps: int, shift: float, include: Sequence[float] = ()) -> list[float]:
    """Descending sigmas from 1 to 0: the shifted ``num_steps`` grid plus ``include`` (timesteps / 1000)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = [1 - i / num_steps for i in range(num_steps + 1)]
    sigmas = [shifted(v, shift) for v in s]
    for t in include:  # a recorded timestep replaces a grid point within float32 rounding of it, else joins
        sigma = round(float(t) / 1000.0, 9)
        near = [i for i, g in enumerate(sigmas) if abs(g - sigma) < 1e-6]
        if near:
            sigmas[near[0]] = sigma
        else:
            sigmas.append(sigma)
    return sorted(set(sigmas), reverse=True)


@torch.no_grad()
def sample_teacher(teacher: WanModel, noise: torch.Tensor, context: torch.Tensor, negative: torch.Tensor, *,
                   num_steps: int = 48, shift: float = 5.0, guidance_scale: float = 3.0,
                   record: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample clean latents from ``noise [B, F, C, h, w]``.

    context / negative: text-encoder outputs ``[B, L, text_dim]`` of the prompts and of the negative prompt.
    record: timesteps (e.g. the student's ``[1000, 937.5, 833.33, 625]``) whose states are returned.
    Returns ``(x0, states)``: the clean sample and ``[B, len(record), F, C, h, w]``.
    """
    dtype = next(teacher.parameters()).dtype
    sigmas = euler_sigmas(num_steps, shift, record)
    wanted = {round(float(t) / 1000.0, 9): i for i, t in enumerate(record)}
    states: list[torch.Tensor | None] = [None] * len(record)
    x = noise.to(dtype)
    both = torch.cat([context, negative]).to(dtype)
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        if sigma in wanted:
            states[wanted[sigma]] = x.clone()
        t = torch.full((x.shape[0] * 2,), sigma * 1000.0, device=x.device)
        cond, uncond = teacher(torch.cat([x, x]), t, both).float().chunk(2)
        v = uncond + guidance_scale * (cond - uncond)
        x = (x.float() + (nxt - sigma) * v).to(dtype)
    missing = [t for t, s in zip(record, states) if s is None]
    if missing:
        raise ValueError(f"timesteps {missing} are not in (0, 1000]")
    return x, torch.stack(states, 1) if states else x.new_zeros(x.shape[0], 0, *x.shape[1:])
