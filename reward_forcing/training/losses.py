"""Re-DMD losses: the normalised DMD gradient, the reward-weighted generator loss and the critic loss.

Pure tensor functions (no models, no state), so every formula is unit-testable on CPU: the generator's
(Re-)DMD loss, the critic's flow matching (optionally reward-tilted), the teacher's flow matching and the ODE
init's masked x0 regression.

Conventions: latents are frame-major ``[B, F, C, H, W]`` (any ``[B, ...]`` works: everything after
the batch dimension is reduced over), the scores return x0-predictions, and the flow is
``v = noise - x0`` (see :mod:`reward_forcing.schedule`).

Re-DMD in one line (docs/reference.md, Training)::

    g    = (x0_fake - x0_real) / mean_{F,C,H,W} |x - x0_real|       # normalised DMD gradient
    L    = 0.5 * exp(beta * MQ) * mean((x - sg(x - g))^2)             # dL/dx = exp(beta MQ) g / numel

The surrogate ``mean((x - sg(x - g))^2)`` has value ``mean(g^2)`` and gradient ``2 g / numel``, which
is how DMD injects a gradient that is not the derivative of any loss the generator can compute.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["dmd_gradient", "re_dmd_loss", "reward_weights", "critic_tilt_weights", "critic_loss", "flow_matching_loss",
           "reference_critic_flow", "ode_regression_inputs", "ode_regression_loss"]

RewardWeighting = Literal["per_sample", "first_sample"]


def _sample_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes} (all must be [B, F, C, H, W] and identical)")


def dmd_gradient(
    x: torch.Tensor,
    x0_real_cond: torch.Tensor,
    x0_real_uncond: torch.Tensor,
    x0_fake: torch.Tensor,
    guidance_scale: float = 3.0,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's normalised DMD gradient ``g`` (docs/reference.md, Training: "DMD gradient").

    Args:
        x: generator output (the clean latent the scores were evaluated around), ``[B, ...]``.
        x0_real_cond / x0_real_uncond: teacher ("real score") x0-predictions with the prompt and with
            the negative prompt.
        x0_fake: critic ("fake score") x0-prediction for the prompt. The fake score gets **no** CFG
            (the reference's ``fake_guidance_scale`` is 0).
        guidance_scale: teacher CFG in the reference's parametrisation
            ``x0_real = cond + s * (cond - uncond)`` — s = 3.0 is the usual CFG weight 4.
        compute_dtype: the scores usually come out in bf16; the difference of two nearby x0 predictions
            and the per-sample normaliser are computed in this dtype (float32 by default) to avoid bf16
            cancellation.

    Returns:
        ``(grad, x0_real)`` in ``compute_dtype``, both without autograd history. ``grad`` is
        ``nan_to_num((x0_fake - x0_real) / n)`` with the per-sample normaliser
        ``n_i = mean |x_i - x0_real_i|`` over all non-batch dims (DMD's adaptive weighting, which makes the
        gradient scale independent of how far the teacher's x0 is from the sample).

    ``nan_to_num`` is applied exactly as in the reference: where the normaliser is 0 (the sample equals
    the teacher's x0), ``0/0`` becomes 0 but a non-zero difference becomes ``±inf`` and then the largest
    finite value of ``compute_dtype``. That case does not happen with real models; it is kept for parity.
    """
    _check_same_shape(x=x, x0_real_cond=x0_real_cond, x0_real_uncond=x0_real_uncond, x0_fake=x0_fake)
    if x.dim() < 2:
        raise ValueError(f"expected batched latents [B, ...], got shape {tuple(x.shape)}")
    with torch.no_grad():
        x = x.detach().to(compute_dtype)
        cond = x0_real_cond.detach().to(compute_dtype)
        uncond = x0_real_uncond.detach().to(compute_dtype)
        fake = x0_fake.detach().to(compute_dtype)
        x0_real = cond + guidance_scale * (cond - uncond)
        grad = fake - x0_real
        normaliser = (x - x0_real).abs().mean(dim=_sample_dims(x), keepdim=True)
        grad = torch.nan_to_num(grad / normaliser)
    return grad, x0_real


def reward_weights(
    reward: torch.Tensor | float | None,
    batch_size: int,
    beta: float = 2.0,
    reward_weighting: RewardWeighting = "per_sample",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample weights ``w_i = exp(beta * reward_i)`` as a ``[B]`` tensor without autograd history.

    ``reward`` is a constant here (the reward model only scores the decoded video), so it is detached.
    ``None`` or ``beta == 0`` gives all-ones weights (plain DMD). A scalar / 1-element reward is shared by
    the batch. ``"first_sample"`` reproduces the reference (docs/reference.md, quirk 10): only sample 0 is
    scored and its weight multiplies every sample's loss.
    """
    if reward_weighting not in ("per_sample", "first_sample"):
        raise ValueError(f"reward_weighting must be 'per_sample' or 'first_sample', got {reward_weighting!r}")
    if reward is None or beta == 0:
        return torch.ones(batch_size, dtype=dtype, device=device)
    r = torch.as_tensor(reward).detach().to(device=device, dtype=dtype).reshape(-1)
    if r.numel() == 1 or reward_weighting == "first_sample":
        if r.numel() == 0:
            raise ValueError("reward is empty")
        r = r[:1].expand(batch_size)
    elif r.numel() != batch_size:
        raise ValueError(f"reward has {r.numel()} entries but the batch has {batch_size} samples "
                         "(pass one reward per sample, or a single scalar)")
    return torch.exp(beta * r)


def re_dmd_loss(
    x: torch.Tensor,
    grad: torch.Tensor,
    reward: torch.Tensor | float | None = None,
    beta: float = 2.0,
    *,
    reward_weighting: RewardWeighting = "per_sample",
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-weighted DMD generator loss (Re-DMD).

    ``loss = mean_i 0.5 * w_i * mean((x_i - sg(x_i - g_i))^2)`` with ``w_i = exp(beta * reward_i)``.
    Its value is ``mean_i 0.5 * w_i * mean(g_i^2)`` and its gradient is
    ``dloss/dx_i = w_i * g_i / numel(x_i) / B`` — the DMD gradient scaled per sample by the reward.
    For one sample it equals the reference's ``0.5 * exp(beta MQ) * MSE(x, sg(x - g))`` exactly; for
    B > 1 the per-sample mean averaged over the batch equals the reference's batch-wide MSE when
    all weights are equal.

    Args:
        x: generator output with autograd history, ``[B, ...]``.
        grad: the DMD gradient from :func:`dmd_gradient` (treated as a constant).
        reward: ``[B]`` rewards (the reference uses normalised VideoReward MQ), a scalar, or None.
        beta: reward temperature (2.0 in the reference). ``beta = 0`` or ``reward=None`` is plain DMD.
        reward_weighting: ``"per_sample"`` (each sample weighted by its own reward) or ``"first_sample"``
            (the reference bug: sample 0's weight applied to the whole batch).
        compute_dtype: dtype of the squared error (the reference uses float64); the loss is returned in
            float32.

    Returns:
        ``(loss, info)``; ``info`` holds detached tensors: ``weights`` ``[B]``, ``per_sample_loss`` ``[B]``
        (weighted), ``dmd_grad_norm`` = ``mean|g|`` (the reference's ``dmdtrain_gradient_norm``).
    """
    _check_same_shape(x=x, grad=grad)
    if x.dim() < 2:
        raise ValueError(f"expected batched latents [B, ...], got shape {tuple(x.shape)}")
    batch = x.shape[0]
    weights = reward_weights(reward, batch, beta, reward_weighting, dtype=compute_dtype, device=x.device)

    xc = x.to(compute_dtype)
    target = (xc - grad.detach().to(compute_dtype)).detach()
    mse = (xc - target).pow(2).mean(dim=_sample_dims(x))        # [B]
    per_sample = 0.5 * weights * mse
    loss = per_sample.mean().float()

    info = {
        "weights": weights.detach().float(),
        "per_sample_loss": per_sample.detach().float(),
        "dmd_grad_norm": grad.detach().abs().mean().float(),
    }
    return loss, info


def flow_matching_loss(flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic (docs/reference.md, Training: "Critic loss") and of teacher training:
    ``mean((v_pred - (noise - x0))^2)``.

    ``flow_pred`` is the critic's flow for ``x_t = add_noise(x0, noise, t)`` (the reference converts the
    critic's x0-prediction back with ``x0_to_flow`` on the generator's grid). The target is a constant: x0
    comes from a no-grad generator rollout, and the critic loss must never train the generator.
    Computed in float32, returns a float32 scalar.
    """
    _check_same_shape(flow_pred=flow_pred, noise=noise, x0=x0)
    target = (noise.detach().float() - x0.detach().float())
    return (flow_pred.float() - target).pow(2).mean()


def critic_tilt_weights(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """Self-normalised weights ``w_i = exp(-beta r_i) / mean_j exp(-beta r_j)`` of the critic's samples ``[B]``
    (detached, float32, mean exactly 1 up to rounding).

    Weighting the critic's flow matching by ``w`` makes it learn the score of ``p_theta exp(-beta r) / Z``
    instead of ``p_theta``; DMD then moves the student until that tilted density matches the teacher, i.e. to
    ``p_theta ~ p_real exp(+beta r)`` (docs/toy_world.md, "Re-DMD"). ``beta > 0`` favours high reward. Computed
    as a softmax, so large ``|beta r|`` cannot overflow; ``beta = 0`` gives exactly ones.
    """
    r = torch.as_tensor(reward).detach().float().reshape(-1)
    if r.numel() == 0:
        raise ValueError("reward is empty")
    return torch.softmax(-beta * r, dim=0) * r.numel()


def critic_loss(flow_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """The critic's flow-matching loss (DMD's fake-score update). Without ``weights`` it is
    :func:`flow_matching_loss` itself, bit for bit; with per-sample ``weights [B]`` (e.g.
    :func:`critic_tilt_weights`) it is ``mean_i w_i * mean((v_pred_i - (noise_i - x0_i))^2)``."""
    if weights is None:
        return flow_matching_loss(flow_pred, noise, x0)
    _check_same_shape(flow_pred=flow_pred, noise=noise, x0=x0)
    if weights.shape != (flow_pred.shape[0],):
        raise ValueError(f"critic weights have shape {tuple(weights.shape)}; expected one per sample "
                         f"({flow_pred.shape[0]},)")
    target = noise.detach().float() - x0.detach().float()
    per_sample = (flow_pred.float() - target).pow(2).mean(dim=_sample_dims(flow_pred))
    return (weights.detach().float() * per_sample).mean()


def reference_critic_flow(flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule, score_schedule
                          ) -> torch.Tensor:
    """The reference's critic flow (``training.critic_flow_from_x0``): the critic's flow converted to x0 on the
    score grid (shift 8) and back to flow on the student's grid (shift 5). ``schedule`` / ``score_schedule``
    are :class:`~reward_forcing.schedule.FlowMatchSchedule` objects."""
    return schedule.x0_to_flow(score_schedule.flow_to_x0(flow, x_t, t), x_t, t)


def ode_regression_inputs(states: torch.Tensor, timesteps: Sequence[float], frames_per_block: int, *,
                          clean_context: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ODE init's inputs from trajectories ``states [B, S + 1, F, C, h, w]`` (the states at the student's
    ``S`` timesteps, then the clean sample): each block takes the state at a random one of the timesteps; with
    ``clean_context`` a random prefix of blocks is instead the clean sample at t = 0, as the inference cache holds
    them (they only serve the blocks after them, so the prefix is shorter than the video and carries no loss).

    Returns ``(x_t [B, F, C, h, w], t [B, F], trained [B, F])``; draws from the global RNG on ``states``' device.
    """
    device = states.device
    steps = torch.tensor(list(timesteps), device=device)
    b, s1, f = states.shape[:3]
    if s1 != len(steps) + 1:
        raise ValueError(f"the ODE pairs hold {s1 - 1} states per trajectory; the student has {len(steps)} "
                         f"timesteps {list(timesteps)}: regenerate them for this schedule")
    blocks = f // frames_per_block
    index = torch.randint(len(steps), (b, blocks), device=device)
    prefix = torch.randint(blocks if clean_context else 1, (b, 1), device=device)
    clean = torch.arange(blocks, device=device) < prefix
    index = torch.where(clean, len(steps), index).repeat_interleave(frames_per_block, dim=1)
    x_t = states[torch.arange(b, device=device)[:, None], index, torch.arange(f, device=device)]
    t = torch.cat([steps, steps.new_zeros(1)])[index]  # one timestep per block
    trained = (~clean).repeat_interleave(frames_per_block, dim=1).float()
    return x_t, t, trained


def ode_regression_loss(x0_pred: torch.Tensor, x0: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """The ODE init's loss: mean squared error of the x0 prediction ``[B, F, ...]`` against the teacher's clean
    sample, over the frames with ``trained [B, F]`` set (the clean-context prefix is excluded)."""
    error = (x0_pred - x0.float()).pow(2).flatten(2).mean(-1)  # [B, F]
    return (error * trained).sum() / trained.sum()
