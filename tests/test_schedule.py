"""The flow-matching schedule against the reference's numbers (tests/golden/scheduler*) and diffusers."""
import json

import pytest
import torch

from reward_forcing.schedule import FlowMatchSchedule, sample_training_timesteps, shift_timestep
from conftest import elementwise_atol, load_golden


@pytest.fixture(scope="module")
def examples(golden_dir):
    return load_golden(golden_dir, "scheduler_examples.safetensors")


@pytest.mark.parametrize("shift", [5, 8])
def test_grid_matches_reference_bit_for_bit(examples, golden_dir, shift):
    sched = FlowMatchSchedule(shift)
    assert torch.equal(sched.sigmas, examples[f"sigmas_shift{shift}"])
    assert torch.equal(sched.timesteps, examples[f"timesteps_shift{shift}"])
    grid = json.loads((golden_dir / "scheduler.json").read_text())[f"shift{shift}"]
    assert sched.timesteps.tolist() == pytest.approx(grid["timesteps"], abs=0)


def test_warped_steps(examples):
    assert FlowMatchSchedule(5).warp([1000, 750, 500, 250]) == examples["warped_denoising_step_list_shift5"].tolist()
    assert FlowMatchSchedule(5).warp([1000, 750, 500, 250]) == [1000.0, 937.5, 833.3333129882812, 625.0]
    assert FlowMatchSchedule(8).warp([1000, 750, 500, 250]) == examples["warped_denoising_step_list_shift8"].tolist()
    with pytest.raises(ValueError, match="outside"):
        FlowMatchSchedule(5).warp([1001])


def test_add_noise_snaps_to_grid(examples):
    sched = FlowMatchSchedule(5)
    t = examples["add_noise.t"]  # 0, 20, 980, 625, 1000, 937.5, 833.33, 4.98, 2, 500.3, 999.9, 250
    assert torch.equal(sched.grid_index(t), examples["add_noise.grid_index"])
    assert torch.equal(sched.sigma(t), examples["add_noise.sigma"])
    x_t = sched.add_noise(examples["add_noise.x0"], examples["add_noise.eps"], t)
    assert (x_t - examples["add_noise.x_t"]).abs().max() <= elementwise_atol(examples["add_noise.x_t"])
    # t = 0 noises with the last grid sigma 0.00498, not 0, as in the reference (docs/reference.md, quirk 8).
    assert sched.sigma(torch.tensor(0.0)).item() == pytest.approx(0.004980080295354128, abs=1e-9)


def test_add_noise_per_frame_timesteps_and_dtype():
    sched = FlowMatchSchedule(5)
    x0, noise = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5, dtype=torch.bfloat16)
    t = torch.tensor([[1000.0, 625.0, 20.0], [980.0, 0.0, 250.0]])
    out = sched.add_noise(x0, noise, t)
    assert out.dtype == torch.bfloat16
    sigma = sched.sigma(t)
    expected = (1 - sigma[..., None, None, None]) * x0 + sigma[..., None, None, None] * noise.float()
    assert torch.allclose(out.float(), expected, atol=1e-2)
    assert torch.equal(out[0, 0], noise[0, 0])  # sigma(1000) = 1


def test_flow_x0_conversions_float64(examples):
    t, x_t, flow = examples["add_noise.t"], examples["add_noise.x_t"], examples["convert.flow"]
    for shift in (5, 8):
        x0 = FlowMatchSchedule(shift).flow_to_x0(flow, x_t, t)
        expected = examples[f"convert.x0_from_flow_shift{shift}"]
        assert (x0 - expected).abs().max() <= elementwise_atol(expected)
    assert torch.equal(FlowMatchSchedule(8).grid_index(t, precision=torch.float64), examples["convert.grid_index_shift8"])
    v = FlowMatchSchedule(5).x0_to_flow(examples["add_noise.x0"], x_t, t)
    expected = examples["convert.flow_from_x0_shift5"]
    assert (v - expected).abs().max() <= elementwise_atol(expected)


def test_training_timestep_shift_and_clamp(examples):
    raw = examples["dmd_timestep.raw_randint"]
    mapped = shift_timestep(raw, 5.0).clamp(20, 980)
    assert torch.equal(mapped, examples["dmd_timestep.shifted_clamped"])
    assert int((mapped == 980).sum()) == 92 and int((mapped == 20).sum()) == 5
    drawn = sample_training_timesteps((4000,), rng=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.float32 and drawn.min() >= 20 and drawn.max() <= 980


def test_grid_matches_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = FlowMatchSchedule(5)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    assert theirs.timesteps.shape == ours.timesteps.shape
    assert (theirs.sigmas[:1000].float() - ours.sigmas).abs().max() <= elementwise_atol(ours.sigmas)
    assert (theirs.timesteps.float() - ours.timesteps).abs().max() <= elementwise_atol(ours.timesteps)
