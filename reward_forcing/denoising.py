"""The one block loop: few-step denoising of one block of latent frames against the KV cache.

Everything that generates with the causal student goes through :class:`BlockDenoiser`: the live session
(``interactive/session.py``) and the streaming pipeline built on it (``pipeline.py``), the self-forcing rollout of
training (``training/rollout.py``) and, through the pipeline, the benchmark. A block is denoised in two phases (docs/reference.md, Inference loop):

1. **steps**: at each warped timestep ``t_k`` predict x0 from the current noisy block, then re-noise x0 to
   ``t_{k+1}`` with fresh Gaussian noise. Inference runs every step; the training rollout stops at a random
   *exit step* ``e`` whose forward (alone) carries gradients, and that step's x0 is the block;
2. the **context pass**: one more forward of the clean block at ``t = context_noise`` (0), whose only job is to
   overwrite the block's KV-cache slots with clean keys/values. Its output is discarded. With
   ``context_pass=False`` (``schedule.context_pass: false``, an inference speed lever: 4 forwards per block
   instead of 5) it is skipped and the cache keeps the keys/values of the last denoising step's forward.

Latents are in the pipeline layout ``[B, f, C, h, w]`` throughout (``WanModel`` takes that layout too).
Noise comes from a ``draw(shape) -> tensor`` callable, so a caller decides where randomness lives (a CPU
generator at inference, so a seed gives the same video on every device; the device RNG in training; recorded
draws in the parity tests). A draw may return any shape with the block's element count.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .models.kv_cache import KVCache
from .models.wan import TextContext, WanModel
from .schedule import FlowMatchSchedule

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]
PhaseHook = Callable[[str], None]


def cpu_gaussian(seed: int) -> NoiseSource:
    """``shape -> N(0, I)`` drawn on a seeded CPU generator, so a seed gives the same video on every device."""
    rng = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=rng)


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(device, dtype)``; host tensors reach a GPU through pinned memory without blocking (a plain
    ``.to(cuda)`` from pageable memory waits for the GPU queue to drain). Same values either way."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, dtype=dtype, non_blocking=True)
    return x.to(device, dtype)


class BlockDenoiser:
    """Denoise blocks of latent frames with a causal ``WanModel`` and its KV cache.

    timesteps: the (warped) denoising steps, e.g. ``[1000, 937.5, 833.33, 625]``.
    context_noise: timestep of the context pass (0 at inference and in the reference's training).
    reference_context_noise: the reference's training passes ``t = 0`` through ``add_noise``, which snaps to the
      last grid point (sigma 0.00498) and so adds a little fresh noise before the context pass; True reproduces
      that, False adds noise only when ``context_noise > 0`` (inference behaviour).
    compute_dtype: dtype of the activations (bf16 under mixed precision while FSDP keeps fp32 master weights);
      defaults to the generator's parameter dtype.
    phase_hook: optional ``hook(name)`` called as each phase starts (``"steps"``, ``"context"``); the benchmark
      records timing marks with it, so it times exactly this loop.
    context_pass: False skips the context pass of :meth:`denoise_block` (see the module docstring); explicit
      :meth:`context_pass` calls (a prompt re-cache, a start image) still run.
    """

    def __init__(self, generator: WanModel, schedule: FlowMatchSchedule, timesteps: Sequence[float], *,
                 context_noise: float = 0.0, reference_context_noise: bool = False,
                 compute_dtype: torch.dtype | None = None, phase_hook: PhaseHook | None = None,
                 context_pass: bool = True):
        self.generator = generator
        self.write_clean_context = context_pass
        self.schedule = schedule
        self.timesteps = [float(t) for t in timesteps]
        self.context_noise = float(context_noise)
        self.reference_context_noise = reference_context_noise
        self.compute_dtype = compute_dtype
        self.phase_hook = phase_hook

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.generator.patch_embedding.weight.dtype

    def _phase(self, name: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(name)

    def _noise_like(self, x: torch.Tensor, draw: NoiseSource) -> torch.Tensor:
        """A fresh draw shaped like ``x``, on its device and dtype."""
        return to_device(draw(tuple(x.shape)).reshape(x.shape), x.device, x.dtype)

    def _times(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.full(tuple(x.shape[:2]), t, device=x.device, dtype=torch.float32)

    def predict_x0(self, x: torch.Tensor, t: float, text: torch.Tensor | TextContext, cache: KVCache,
                   start: int) -> torch.Tensor:
        """One student forward at timestep ``t`` on the block starting at latent frame ``start``; returns x0."""
        x = x.to(self.dtype)
        timestep = self._times(x, t)
        flow = self.generator(x, timestep, text, kv_cache=cache, start_frame=start)
        return self.schedule.flow_to_x0(flow, x.to(flow.dtype), timestep)

    def steps(self, noise: torch.Tensor, text: torch.Tensor | TextContext, cache: KVCache, start: int,
              draw: NoiseSource, *, exit_step: int | None = None, grad: bool = False) -> torch.Tensor:
        """Denoise ``noise [B, f, C, h, w]`` through steps ``0..exit_step`` (default: all); returns that step's x0.

        Steps before the exit step run without grad; the exit step runs with grad when ``grad`` is True, so in
        training gradients flow only through each block's own exit forward.
        """
        last = len(self.timesteps) - 1 if exit_step is None else exit_step
        if not 0 <= last < len(self.timesteps):
            raise ValueError(f"exit_step {exit_step} outside [0, {len(self.timesteps)})")
        self._phase("steps")
        x = noise
        with torch.no_grad():
            for k in range(last):
                x0 = self.predict_x0(x, self.timesteps[k], text, cache, start)
                x = self.schedule.add_noise(x0, self._noise_like(x0, draw), self._times(x0, self.timesteps[k + 1]))
        with torch.set_grad_enabled(grad):
            return self.predict_x0(x, self.timesteps[last], text, cache, start)

    @torch.no_grad()
    def context_pass(self, clean: torch.Tensor, text: torch.Tensor | TextContext, cache: KVCache, start: int,
                     draw: NoiseSource | None = None) -> None:
        """Write the clean block ``[B, f, C, h, w]`` starting at frame ``start`` into the cache (output unused)."""
        self._phase("context")
        clean = clean.detach()
        if self.context_noise > 0 or self.reference_context_noise:
            clean = self.schedule.add_noise(clean, self._noise_like(clean, draw),
                                            self._times(clean, self.context_noise))
        self.predict_x0(clean, self.context_noise, text, cache, start)

    def denoise_block(self, noise: torch.Tensor, text: torch.Tensor | TextContext, cache: KVCache, start: int,
                      draw: NoiseSource, *, exit_step: int | None = None, grad: bool = False) -> torch.Tensor:
        """:meth:`steps` then :meth:`context_pass`: the block's x0, its clean keys/values left in the cache (or,
        without the context pass, those of its last step)."""
        x0 = self.steps(noise, text, cache, start, draw, exit_step=exit_step, grad=grad)
        if self.write_clean_context:
            self.context_pass(x0, text, cache, start, draw)
        return x0
