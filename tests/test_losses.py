"""Re-DMD loss maths: hand-computed values and autograd against the closed-form gradient."""
import math

import pytest
import torch

from reward_forcing.training.losses import (critic_loss, critic_tilt_weights, dmd_gradient, flow_matching_loss,
                                            ode_regression_inputs, ode_regression_loss, re_dmd_loss, reward_weights)

SHAPE = (2, 3, 2, 2, 2)  # [B, F, C, H, W], 24 elements per sample


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------------------------------ dmd_gradient
def test_dmd_gradient_hand_computed():
    # One sample of 2 elements: x = [1, 2], cond = [0, 1], uncond = [1, 1], fake = [0.5, 0.5], s = 3.
    x = torch.tensor([[1.0, 2.0]])
    cond = torch.tensor([[0.0, 1.0]])
    uncond = torch.tensor([[1.0, 1.0]])
    fake = torch.tensor([[0.5, 0.5]])
    grad, x0_real = dmd_gradient(x, cond, uncond, fake, guidance_scale=3.0)
    # x0_real = cond + 3 (cond - uncond) = [0 - 3, 1 + 0] = [-3, 1]
    torch.testing.assert_close(x0_real, torch.tensor([[-3.0, 1.0]]))
    # raw g = fake - real = [3.5, -0.5]; normaliser = mean(|[4, 1]|) = 2.5
    torch.testing.assert_close(grad, torch.tensor([[3.5 / 2.5, -0.5 / 2.5]]))


def test_dmd_gradient_per_sample_normaliser_and_no_fake_guidance():
    x, cond, uncond, fake = (_rand(*SHAPE) for _ in range(4))
    grad, x0_real = dmd_gradient(x, cond, uncond, fake, guidance_scale=3.0)
    real = uncond + 4.0 * (cond - uncond)  # the same CFG written as weight 4
    torch.testing.assert_close(x0_real, real)
    for i in range(SHAPE[0]):
        n = (x[i] - real[i]).abs().mean()
        torch.testing.assert_close(grad[i], (fake[i] - real[i]) / n)
    # Guidance 0 means the teacher's conditional prediction only.
    _, real0 = dmd_gradient(x, cond, uncond, fake, guidance_scale=0.0)
    torch.testing.assert_close(real0, cond)


def test_dmd_gradient_dtype_and_no_grad():
    x = _rand(*SHAPE).bfloat16().requires_grad_(True)
    others = [_rand(*SHAPE).bfloat16().requires_grad_(True) for _ in range(3)]
    grad, x0_real = dmd_gradient(x, *others)
    assert grad.dtype == torch.float32 and x0_real.dtype == torch.float32
    assert not grad.requires_grad and not x0_real.requires_grad
    grad64, _ = dmd_gradient(x, *others, compute_dtype=torch.float64)
    assert grad64.dtype == torch.float64


def test_dmd_gradient_nan_to_num_zero_normaliser():
    # Sample 0: x == x0_real and fake == real -> 0/0 -> 0.
    # Sample 1: x == x0_real but fake != real -> +-inf -> +-float32 max (reference nan_to_num).
    real = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    x = real.clone()
    fake = torch.tensor([[1.0, -2.0], [1.5, -0.5]])
    grad, _ = dmd_gradient(x, real, real, fake, guidance_scale=3.0)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad[0], torch.zeros(2))
    big = torch.finfo(torch.float32).max
    torch.testing.assert_close(grad[1], torch.tensor([big, -big]))


def test_dmd_gradient_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        dmd_gradient(_rand(1, 2), _rand(1, 2), _rand(1, 2), _rand(1, 3))


# ------------------------------------------------------------------------------------------ re_dmd_loss
def test_re_dmd_loss_hand_computed_single_sample():
    # x = [1, 2], g = [0.5, -1] -> mean(g^2) = (0.25 + 1) / 2 = 0.625; w = exp(2 * 0.3).
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    g = torch.tensor([[0.5, -1.0]])
    loss, info = re_dmd_loss(x, g, reward=torch.tensor([0.3]), beta=2.0)
    w = math.exp(0.6)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(0.5 * w * 0.625, rel=1e-6)
    assert info["weights"].tolist() == pytest.approx([w], rel=1e-6)
    assert info["dmd_grad_norm"].item() == pytest.approx(0.75)
    (dx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(dx, w * g / 2)


def test_re_dmd_loss_gradient_matches_closed_form():
    x = _rand(*SHAPE).requires_grad_(True)
    g = _rand(*SHAPE)
    reward = torch.tensor([0.7, -0.4])
    beta = 2.0
    loss, info = re_dmd_loss(x, g, reward=reward, beta=beta)
    (dx,) = torch.autograd.grad(loss, x)
    numel, batch = x[0].numel(), x.shape[0]
    w = torch.exp(beta * reward)
    expected = w.view(-1, 1, 1, 1, 1) * g / numel / batch
    torch.testing.assert_close(dx, expected)
    # Value: mean_i 0.5 w_i mean(g_i^2).
    value = (0.5 * w * g.pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(value.item(), rel=1e-6)
    torch.testing.assert_close(info["per_sample_loss"], 0.5 * w * g.pow(2).flatten(1).mean(1))


def test_re_dmd_loss_per_sample_weights_scale_each_sample():
    # Same g for both samples; the gradient ratio between them is exp(beta (r0 - r1)).
    g1 = _rand(1, 3, 2, 2, 2)
    g = torch.cat([g1, g1])
    x = _rand(*SHAPE).requires_grad_(True)
    reward = torch.tensor([0.5, -0.25])
    loss, info = re_dmd_loss(x, g, reward=reward, beta=2.0)
    (dx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(dx[0] / dx[1], torch.full_like(dx[0], math.exp(2.0 * 0.75)))
    torch.testing.assert_close(info["weights"], torch.tensor([math.exp(1.0), math.exp(-0.5)]))


def test_re_dmd_loss_beta_zero_and_none_equal_plain_dmd():
    x = _rand(*SHAPE).requires_grad_(True)
    g = _rand(*SHAPE)
    plain = 0.5 * g.pow(2).mean()
    for kwargs in ({"reward": torch.tensor([3.0, -2.0]), "beta": 0.0}, {"reward": None}):
        loss, info = re_dmd_loss(x, g, **kwargs)
        assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
        torch.testing.assert_close(info["weights"], torch.ones(2))
        (dx,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(dx, g / g.numel())  # = g / numel(x_i) / B


def test_re_dmd_loss_first_sample_reproduces_reference_bug():
    x = _rand(*SHAPE).requires_grad_(True)
    g = _rand(*SHAPE)
    reward = torch.tensor([0.5, -1.0])
    loss, info = re_dmd_loss(x, g, reward=reward, beta=2.0, reward_weighting="first_sample")
    w0 = math.exp(1.0)
    torch.testing.assert_close(info["weights"], torch.full((2,), w0))
    # Reference: 0.5 * exp(beta * MQ_0) * MSE over the whole batch (float64).
    ref = 0.5 * w0 * torch.nn.functional.mse_loss(x.double(), (x.double() - g.double()).detach())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (dx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(dx, w0 * g / g.numel())


def test_re_dmd_loss_scalar_reward_and_bad_inputs():
    x = _rand(*SHAPE).requires_grad_(True)
    g = _rand(*SHAPE)
    loss_scalar, _ = re_dmd_loss(x, g, reward=0.2, beta=2.0)
    loss_vec, _ = re_dmd_loss(x, g, reward=torch.tensor([0.2, 0.2]), beta=2.0)
    assert loss_scalar.item() == pytest.approx(loss_vec.item(), rel=1e-7)
    with pytest.raises(ValueError, match="3 entries"):
        re_dmd_loss(x, g, reward=torch.zeros(3))
    with pytest.raises(ValueError, match="reward_weighting"):
        re_dmd_loss(x, g, reward=torch.zeros(2), reward_weighting="mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        re_dmd_loss(x, g[:1])


def test_re_dmd_loss_reward_is_constant_and_bf16_input():
    x = _rand(*SHAPE).bfloat16().requires_grad_(True)
    g = _rand(*SHAPE)
    reward = torch.tensor([0.1, 0.2], requires_grad=True)
    loss, _ = re_dmd_loss(x, g, reward=reward)
    loss.backward()
    assert reward.grad is None and x.grad is not None and x.grad.dtype == torch.bfloat16
    assert reward_weights(None, 3).tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ critic_loss
def test_critic_loss_hand_computed_and_gradient():
    flow = torch.tensor([[1.0, 0.0], [2.0, -1.0]], requires_grad=True)
    noise = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    x0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # target = noise - x0 = [[0.5, -0.5], [1, 0]]; diff = [[0.5, 0.5], [1, -1]]; mean sq = 2.5 / 4
    loss = critic_loss(flow, noise, x0)
    assert loss.item() == pytest.approx(0.625)
    (dflow,) = torch.autograd.grad(loss, flow)
    torch.testing.assert_close(dflow, 2 * torch.tensor([[0.5, 0.5], [1.0, -1.0]]) / 4)


def test_critic_loss_target_is_constant():
    flow = _rand(*SHAPE).requires_grad_(True)
    x0 = _rand(*SHAPE).requires_grad_(True)
    loss = critic_loss(flow, _rand(*SHAPE), x0)
    loss.backward()
    assert x0.grad is None and flow.grad is not None


# ---------------------------------------------------------------------------------- reward-tilted critic
def test_critic_tilt_weights_normalise_and_sign():
    reward = torch.tensor([0.0, 1.0, 0.5, 2.0])
    w = critic_tilt_weights(reward, beta=1.0)
    expected = torch.exp(-reward) / torch.exp(-reward).mean()
    torch.testing.assert_close(w, expected)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w.argmin().item() == 3 and w.argmax().item() == 0  # beta > 0: the critic forgets high reward
    assert torch.equal(critic_tilt_weights(reward, beta=-1.0).argsort(), w.argsort().flip(0))  # the sign flips it
    assert torch.equal(critic_tilt_weights(reward, beta=0.0), torch.ones(4))
    huge = critic_tilt_weights(torch.tensor([0.0, 1000.0]), beta=-1.0)  # no overflow
    assert torch.isfinite(huge).all() and huge.tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="empty"):
        critic_tilt_weights(torch.tensor([]), 1.0)


def test_weighted_critic_loss_hand_computed_and_unweighted_is_bitwise_plain():
    flow = torch.tensor([[1.0, 0.0], [2.0, -1.0]], requires_grad=True)
    noise = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    x0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # per-sample mean squares: 0.25 and 1.0; weighted by 1.5 and 0.5 -> (0.375 + 0.5) / 2
    loss = critic_loss(flow, noise, x0, torch.tensor([1.5, 0.5]))
    assert loss.item() == pytest.approx(0.4375)
    (dflow,) = torch.autograd.grad(loss, flow)
    torch.testing.assert_close(dflow, 2 * torch.tensor([[0.5, 0.5], [1.0, -1.0]]) * torch.tensor([[1.5], [0.5]]) / 4)
    big = (_rand(*SHAPE), _rand(*SHAPE), _rand(*SHAPE))
    assert torch.equal(critic_loss(*big), flow_matching_loss(*big))
    torch.testing.assert_close(critic_loss(*big, torch.ones(SHAPE[0])), flow_matching_loss(*big))
    with pytest.raises(ValueError, match="one per sample"):
        critic_loss(*big, torch.ones(SHAPE[0] + 1))



# ---------------------------------------------------------------------------------- the ODE init's regression
def test_ode_regression_inputs_pick_one_state_per_block_and_a_clean_prefix():
    torch.manual_seed(0)
    b, s, f = 64, 4, 9
    states = torch.arange(b * (s + 1) * f, dtype=torch.float32).view(b, s + 1, f, 1, 1, 1).expand(-1, -1, -1, 2, 2, 2)
    x_t, t, trained = ode_regression_inputs(states, [1000.0, 750.0, 500.0, 250.0], 3, clean_context=True)
    assert x_t.shape == (b, f, 2, 2, 2) and t.shape == trained.shape == (b, f)
    index = (x_t[:, :, 0, 0, 0] - states[:, 0, :, 0, 0, 0]) / f  # which state each frame took
    assert (index.view(b, 3, 3) == index.view(b, 3, 3)[:, :, :1]).all()  # one state per block
    clean = index == s
    assert torch.equal(t[clean], torch.zeros(int(clean.sum()))) and torch.equal(trained, (~clean).float())
    assert not clean[:, -3:].any() and clean.any()  # a prefix, never the last block
    assert ((clean.float().diff(dim=1)) <= 0).all()  # clean blocks come first
    _, _, plain = ode_regression_inputs(states, [1000.0, 750.0, 500.0, 250.0], 3, clean_context=False)
    assert plain.all()
    with pytest.raises(ValueError, match="hold 4 states per trajectory; the student has 3"):
        ode_regression_inputs(states, [1000.0, 750.0, 500.0], 3, clean_context=True)


def test_ode_regression_loss_is_the_mean_over_trained_frames():
    pred, target = torch.zeros(2, 3, 1, 2), torch.ones(2, 3, 1, 2)
    pred[:, 0] = 5.0  # an untrained frame with a big error does not count
    trained = torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    assert ode_regression_loss(pred, target, trained).item() == pytest.approx(1.0)
