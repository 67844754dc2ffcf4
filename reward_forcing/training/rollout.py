"""The self-forcing rollout: the student generates a whole video the way it will at inference.

Block by block against its own KV cache, through the same block loop as inference
(:class:`~reward_forcing.denoising.BlockDenoiser`): for one random exit step ``e`` (shared by every block, and by
every rank), steps ``k < e`` run without grad exactly like inference (predict x0, re-noise to the next step); step
``e`` runs **with** grad and its x0 is the block; then a no-grad context pass writes the clean block into the
cache. Gradients therefore flow only through each block's own exit forward - earlier blocks enter as no-grad
cache entries.

Cache semantics in training: the reference's training cache holds the whole video, so it never evicts and its
sink is never EMA-updated, while the attention window is the same as at inference. That is exactly the ``static``
sink policy here (``rollout_sink_policy``); ``ema`` trains with the inference-time sink instead.
The grad-enabled exit forward reads a snapshot of the cache (see ``kv_cache.py``), so gradient checkpointing
recomputes the same values whatever order autograd recomputes blocks in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoising import BlockDenoiser, NoiseSource
from ..models.kv_cache import CausalSpec
from ..models.wan import WanModel
from ..schedule import FlowMatchSchedule


@dataclass
class RolloutConfig:
    timesteps: list[float]  # warped denoising steps, e.g. [1000, 937.5, 833.33, 625]
    context_noise: float = 0.0  # timestep of the context pass
    # The reference passes t=0 through add_noise, which snaps to the last grid point (sigma 0.00498) and so adds
    # a little fresh noise to the context pass in training (none at inference). False: no noise, as at inference.
    reference_context_noise: bool = False
    sink_policy: str = "static"  # cache policy during the rollout (see the module docstring)


def rollout(
    generator: WanModel,
    schedule: FlowMatchSchedule,
    cfg: RolloutConfig,
    context: torch.Tensor,
    noise: torch.Tensor,
    *,
    exit_step: int,
    grad: bool = True,
    draw: NoiseSource | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate ``noise.shape[1]`` latent frames; returns ``[B, F, C, h, w]`` (with grad through exit forwards).

    context: text-encoder output ``[B, L, text_dim]``; noise: ``[B, F, C, h, w]`` initial noise (pipeline layout);
    exit_step: index into ``cfg.timesteps`` whose forward carries grad (drawn by the caller, broadcast across ranks);
    grad: False for critic rollouts (no graph at all); draw: ``shape -> N(0, I)`` for re-noising.
    compute_dtype: dtype of activations and of the KV cache (bf16 under mixed precision, where the sharded
    parameters themselves stay fp32); defaults to the generator's parameter dtype.
    """
    if not 0 <= exit_step < len(cfg.timesteps):
        raise ValueError(f"exit_step {exit_step} outside [0, {len(cfg.timesteps)})")
    draw = draw or (lambda shape: torch.randn(shape, device=noise.device, dtype=noise.dtype))
    spec: CausalSpec = generator.causal.with_policy(cfg.sink_policy)
    batch, frames, _, h, w = noise.shape
    block = spec.frames_per_block
    if frames % block:
        raise ValueError(f"{frames} latent frames is not a multiple of the {block}-frame block")
    device = noise.device
    denoiser = BlockDenoiser(generator, schedule, cfg.timesteps, context_noise=cfg.context_noise,
                             reference_context_noise=cfg.reference_context_noise, compute_dtype=compute_dtype)
    cache = generator.new_kv_cache(batch, h, w, spec=spec, max_frames=frames, device=device, dtype=denoiser.dtype)
    # Every call gets the raw context and goes through forward(): under FSDP2 the root's parameters (text
    # MLP) are only gathered inside forward, so precomputing cross-attention K/V outside it is not possible.
    text = context.to(denoiser.dtype)
    blocks = [denoiser.denoise_block(noise[:, start:start + block], text, cache, start, draw, exit_step=exit_step,
                                     grad=grad)
              for start in range(0, frames, block)]
    return torch.cat(blocks, dim=1)
