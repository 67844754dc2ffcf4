"""Self-forcing rollout: equals inference when fully no-grad, the exit step carries the only gradient path."""
import pytest
import torch

from reward_forcing.models.kv_cache import CausalSpec
from reward_forcing.models.wan import WanModel, init_random_
from reward_forcing.pipeline import StreamingPipeline
from reward_forcing.schedule import FlowMatchSchedule
from reward_forcing.training.rollout import RolloutConfig, rollout

STEPS = FlowMatchSchedule(5).warp([1000, 750, 500, 250])


@pytest.fixture
def student():
    return init_random_(WanModel.from_flavor("tiny", causal=CausalSpec(local_attn_size=6, sink_policy="static")),
                        seed=3)


def draws(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_last_exit_without_grad_equals_the_inference_pipeline(student):
    ctx, noise = torch.randn(1, 5, 32), torch.randn(1, 9, 16, 4, 6)
    eps = draws(9, (1, 3, 16, 4, 6))
    it = iter(eps)
    with torch.no_grad():
        ours = rollout(student, FlowMatchSchedule(5), RolloutConfig(STEPS, sink_policy="static"), ctx, noise,
                       exit_step=3, grad=False, draw=lambda shape: next(it))
        _, ref = StreamingPipeline(student, None, None).generate(context=ctx, num_frames=9, height=32, width=48,
                                                                 noise=noise, renoise=eps, decode=False)
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("exit_step", [0, 2])
def test_calls_per_block_and_grad_only_through_exit(student, exit_step):
    calls = []
    original = student.forward

    def spy(x, t, *args, **kwargs):
        calls.append((float(t.flatten()[0]), torch.is_grad_enabled()))
        return original(x, t, *args, **kwargs)

    student.forward = spy
    noise = torch.randn(1, 6, 16, 4, 6, requires_grad=True)
    x = rollout(student, FlowMatchSchedule(5), RolloutConfig(STEPS), torch.randn(1, 5, 32), noise,
                exit_step=exit_step)
    del student.forward
    per_block = [(STEPS[k], False) for k in range(exit_step)] + [(STEPS[exit_step], True), (0.0, False)]
    assert calls == per_block * 2
    # Block 1's output depends on the weights, and on block 0 only through detached cache entries.
    x[:, 3:].sum().backward()
    assert student.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert noise.grad is None or noise.grad[:, :3].abs().sum() == 0
    if exit_step == 0:  # the exit forward sees this block's own noise directly
        assert noise.grad[:, 3:].abs().sum() > 0


def test_gradient_checkpointing_does_not_change_rollout_gradients(student):
    ctx, noise = torch.randn(1, 5, 32), torch.randn(1, 9, 16, 4, 6)
    grads = []
    for ckpt in (False, True):
        student.enable_gradient_checkpointing(ckpt)
        student.zero_grad()
        torch.manual_seed(0)
        rollout(student, FlowMatchSchedule(5), RolloutConfig(STEPS), ctx, noise, exit_step=1).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_reference_context_noise_switch_changes_the_cache(student):
    ctx, noise = torch.randn(1, 5, 32), torch.randn(1, 6, 16, 4, 6)
    outs = []
    for reference in (False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(rollout(student, FlowMatchSchedule(5), RolloutConfig(STEPS, reference_context_noise=reference),
                                ctx, noise, exit_step=0, grad=False))
    assert torch.equal(outs[0][:, :3], outs[1][:, :3])  # block 0 is produced before any context pass
    assert not torch.equal(outs[0][:, 3:], outs[1][:, 3:])  # sigma 0.00498 of context noise reaches block 1


def test_bad_exit_step(student):
    with pytest.raises(ValueError, match="exit_step 4"):
        rollout(student, FlowMatchSchedule(5), RolloutConfig(STEPS), torch.randn(1, 5, 32),
                torch.randn(1, 3, 16, 4, 6), exit_step=4)
