"""Shifted flow-matching schedule: the sigma grid, the warped few-step list, noising and x0 <-> flow.

Conventions (the whole project uses them):
  * timesteps are floats in [0, 1000] (raw, not divided by 1000);
  * ``x_t = (1 - sigma) * x0 + sigma * noise`` and the DiT predicts the flow ``v = noise - x0``,
    so ``x0 = x_t - sigma * v``.

The grid reproduces the reference's flow-matching scheduler (docs/reference.md, Scheduler) after
``set_timesteps(1000, training=True)`` bit for bit (float32): ``s_i = 1 - i/1000`` and
``sigma_i = shift * s_i / (1 + (shift - 1) * s_i)``. Every lookup snaps a timestep to the *nearest grid
point*, which is what the reference does and why ``t = 0`` noises with sigma = 0.00498 (the last grid point),
not 0. Conversions run in float64, as the reference wrapper does.

diffusers' ``FlowMatchEulerDiscreteScheduler`` has the same grid but looks timesteps up by exact equality,
so it crashes on the clamped values (20, 980) training uses; hence this small file.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


NUM_TRAIN_TIMESTEPS = 1000  # timesteps are floats in [0, 1000]; the grid has this many points


def shifted(u, shift: float):
    """The shift warp of a noise level ``u`` in [0, 1]: ``shift u / (1 + (shift - 1) u)``, for tensors or floats
    (one formula, one operation order, so the grid, the timestep warp and the sampler agree bit for bit)."""
    return shift * u / (1 + (shift - 1) * u)


class FlowMatchSchedule:
    """The 1000-point shifted sigma grid and the operations defined on it."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        # Same float32 op order as the reference so the grid matches exactly.
        s = torch.linspace(1.0, 0.0, self.num_train_timesteps + 1)[:-1]
        self.sigmas = shifted(s, self.shift)
        self.timesteps = self.sigmas * self.num_train_timesteps
        self._on_device: dict = {}  # (name, device, dtype) -> grid copy: no host-to-device copy per call

    def _grid(self, name: str, device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._on_device[key]

    # ----------------------------------------------------------------------------------------- lookups
    def grid_index(self, t: torch.Tensor | float, *, precision: torch.dtype = torch.float32) -> torch.Tensor:
        """Index of the grid timestep nearest to each entry of ``t`` (flattened, int64).

        ``precision`` is the dtype the distance is computed in: the reference's add_noise compares in
        float32, its flow/x0 conversions in float64 (they differ only on exact ties).
        """
        t = torch.as_tensor(t).reshape(-1)
        grid = self._grid("timesteps", t.device, precision)
        return (grid[None, :] - t.to(precision)[:, None]).abs().argmin(dim=1)

    def sigma(self, t: torch.Tensor | float, *, precision: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma of the grid point nearest to each timestep; shape of ``t``, dtype ``precision``."""
        t = torch.as_tensor(t)
        index = self.grid_index(t, precision=precision)
        return self._grid("sigmas", t.device, precision)[index].reshape(t.shape)

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Few-step list in the shifted time: ``concat(timesteps, [0])[1000 - step]`` (reference warp).

        ``[1000, 750, 500, 250]`` -> ``[1000, 937.5, 833.33, 625]`` for shift 5.
        """
        extended = torch.cat([self.timesteps, torch.zeros(1)])
        out = []
        for step in steps:
            index = self.num_train_timesteps - int(round(float(step)))
            if not 0 <= index <= self.num_train_timesteps:
                raise ValueError(f"denoising step {step} is outside [0, {self.num_train_timesteps}]")
            out.append(float(extended[index]))
        return out

    def denoising_timesteps(self, steps: Sequence[float], warp: bool = True) -> list[float]:
        """The student's few-step timesteps of a config's ``denoising_step_list``: warped (``warp_denoising_step``,
        the reference's default) or as given."""
        return self.warp(steps) if warp else [float(s) for s in steps]

    # ------------------------------------------------------------------------------------------- maths
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma noise`` with sigma snapped to the grid, in the dtype of ``noise``.

        ``t`` is a scalar or has the leading shape of ``x0`` (e.g. ``[B]`` or ``[B, F]`` for frame-major
        latents ``[B, F, C, H, W]``): one sigma per leading entry.
        """
        t = torch.as_tensor(t, device=x0.device)
        sigma = self.sigma(t).to(x0.device)
        sigma = sigma.reshape(*sigma.shape, *([1] * (x0.dim() - sigma.dim())))
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def _sigma64(self, t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device)
        sigma = self.sigma(t, precision=torch.float64)
        return sigma.reshape(*sigma.shape, *([1] * (like.dim() - sigma.dim())))

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``x0 = x_t - sigma * v`` in float64, returned in the dtype of ``flow``."""
        sigma = self._sigma64(t, flow)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``v = (x_t - x0) / sigma`` in float64, returned in the dtype of ``x0``."""
        sigma = self._sigma64(t, x0)
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)


def shift_timestep(t: torch.Tensor, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Map timesteps through the shift warp: ``T * shifted(t / T)`` (float32)."""
    return shifted(t / num_train_timesteps, shift) * num_train_timesteps


def sample_training_timesteps(
    shape: Sequence[int],
    *,
    shift: float = 5.0,
    min_t: float = 20.0,
    max_t: float = 980.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    device: torch.device | str | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """DMD / critic timesteps: uniform integers in [0, T), shifted, clamped to [min_t, max_t] (float32)."""
    raw = torch.randint(0, num_train_timesteps, tuple(shape), device=device, generator=rng)
    return shift_timestep(raw, shift, num_train_timesteps).clamp(min_t, max_t)
