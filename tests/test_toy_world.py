"""The toy world and the stages it drives: exact metrics on its data, its text encoder and reward, the identity
decoder, the teacher sampler, ODE pairs, the ode and teacher training modes, and scripts/toy_world.py --smoke."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from reward_forcing.build import build_dit, build_pipeline, build_reward, build_text_encoder, build_vae
from reward_forcing.config import ConfigError, load_config
from reward_forcing.data import latent_videos, ode_pairs
from reward_forcing.models.vae import IdentityVAE
from reward_forcing.sampling import euler_sigmas, sample_teacher
from reward_forcing.schedule import FlowMatchSchedule
from reward_forcing.toy import ToyMotionReward, ToyTextEncoder, ToyWorld, all_prompts, metrics
from reward_forcing.toy import evaluate as ev
from reward_forcing.training import parallel
from reward_forcing.training.build import build_training_models
from reward_forcing.training import trainer as trainer_module
from reward_forcing.training.losses import flow_matching_loss
from reward_forcing.training.run import lr_factor, training_budget
from reward_forcing.training.trainer import Trainer
from conftest import REPO_ROOT

TOY = REPO_ROOT / "configs" / "toy"
WORLD = ToyWorld()


def clips(prompts, frames=9, seed=0):
    return WORLD.render(prompts, frames, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the data
def test_metrics_are_exact_on_the_data():
    prompts = ["red fast left", "green static up", "blue fast down", "red static right"] * 3
    videos, speed = clips(prompts, frames=21)
    assert videos.shape == (12, 21, 3, 8, 8) and videos.min() >= -1 and videos.max() <= 1
    assert speed.tolist() == [0.75, 0.0, 0.75, 0.0] * 3
    assert torch.allclose(metrics.net_motion(videos), speed, atol=1e-3)  # wraps round the torus 2 times
    assert torch.allclose(metrics.net_motion(videos, span=7), speed, atol=1e-3)
    assert metrics.flicker(videos).max() < 0.01
    assert metrics.colour_accuracy(videos, prompts).min() == 1.0
    assert metrics.blobs_per_frame(videos).tolist() == [1.0] * 12
    assert metrics.copy_score(videos, slice(0, 21))[1] == pytest.approx(1.0)  # a static blob copies frame 0


def test_directions_move_the_blob_the_right_way():
    for prompt, (dx, dy) in {"red fast left": (-1, 0), "red fast right": (1, 0), "red fast up": (0, -1),
                             "red fast down": (0, 1)}.items():
        step = metrics.positions(clips([prompt])[0]).diff(dim=1).mean(1)[0]
        assert torch.allclose(step, torch.tensor([dx, dy]) * WORLD.fast_speed, atol=1e-3), prompt


def test_direction_accuracy_is_exact_on_the_data_and_sees_a_wrong_direction():
    prompts = ev.eval_prompts(("fast",), 2)  # every colour x direction, twice
    videos, _ = clips(prompts, seed=3)
    assert metrics.direction_correct(videos, prompts).tolist() == [1.0] * 24
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    swapped = [p.rsplit(" ", 1)[0] + " " + opposite[p.rsplit(" ", 1)[1]] for p in prompts]
    assert metrics.direction_correct(videos, swapped).sum() == 0
    velocity = metrics.velocity(videos[:4])  # red left, right, up, down
    assert torch.allclose(velocity, torch.tensor([[-1.0, 0], [1, 0], [0, -1], [0, 1]]) * WORLD.fast_speed, atol=1e-3)
    static_prompts = ev.eval_prompts(("static",), 1)
    both = torch.cat([videos, clips(static_prompts)[0]])
    groups = ev.group_metrics(both, prompts + static_prompts)
    assert groups["fast"].direction_accuracy == 1.0 and groups["static"].direction_accuracy is None


def test_jitter_is_not_motion_and_any_is_bimodal():
    static, _ = clips(["blue static left"] * 8, frames=9)
    noise = torch.Generator().manual_seed(1)
    jittered = static + 0.15 * torch.randn(static.shape, generator=noise)
    assert metrics.net_motion(jittered).max() < 0.1  # jitter around a fixed point has no net motion
    _, speed = clips(["green any up"] * 400)
    assert 0.4 < (speed > 0).float().mean().item() < 0.6 and set(speed.tolist()) == {0.0, 0.75}


def test_a_resampled_world_changes_the_any_mode_share():
    world = ToyWorld(any_fast=0.63)
    _, speed = world.render(["green any up"] * 2000, 3, torch.Generator().manual_seed(0))
    assert abs((speed > 0).float().mean().item() - 0.63) < 0.03
    from reward_forcing.data import latent_videos
    videos = latent_videos("toy", num_frames=9, seed=0, toy_any_fast=1.0)
    latents, prompts = videos.get(["red any left"] * 8)
    assert (metrics.net_motion(latents) > 0.7).all() and prompts == ["red any left"] * 8


def test_bad_toy_prompt_is_one_clear_line():
    with pytest.raises(ValueError, match="'red slow left' is not '<colour> <speed> <direction>'"):
        WORLD.render(["red slow left"], 3)


def test_text_encoder_reward_and_identity_decoder():
    text = ToyTextEncoder()
    a, b = text(["red fast left", "red static left"]), ToyTextEncoder()(["red fast left"])
    assert a.shape == (2, 3, 32) and torch.equal(a[0], b[0])  # deterministic word table
    assert torch.equal(a[0, 0], a[1, 0]) and not torch.equal(a[0, 1], a[1, 1])
    assert text.encode_negative("", 3).abs().sum() == 0  # the unconditional input
    videos, speed = clips(["red fast left", "red static left"])
    assert torch.allclose(ToyMotionReward().score(videos, [])["motion"], speed / WORLD.fast_speed, atol=1e-3)
    vae = IdentityVAE()
    assert vae.latent_size(8, 8) == (8, 8) and vae.video_frames(9) == 9
    assert torch.equal(vae.stream_decoder().decode(videos), videos.clamp(-1, 1))


def test_committed_prompt_list_is_the_vocabulary():
    assert (TOY / "prompts.txt").read_text().split("\n")[:-1] == all_prompts()


def test_toy_configs_build_the_toy_parts():
    cfg = load_config(TOY / "dmd.yaml")
    assert isinstance(build_text_encoder(cfg), ToyTextEncoder) and isinstance(build_vae(cfg), IdentityVAE)
    assert isinstance(build_reward(cfg), ToyMotionReward)
    for name, mode in {"teacher": "teacher", "ode": "ode", "dmd": "dmd"}.items():
        assert load_config(TOY / f"{name}.yaml").training.mode == mode
    with pytest.raises(ConfigError, match="training.mode: 'distill' is not one of"):
        load_config(TOY / "dmd.yaml", ["training.mode=distill"])
    with pytest.raises(ValueError, match="height x width 12x8 must be positive multiples of 16 .the decoder's stride 8"):
        build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml", ["video.height=12", "video.width=8"]))
    assert build_pipeline(load_config(TOY / "dmd.yaml", ["video.height=3", "video.width=5",  # the identity: stride 1
                                                         "model.random_init=true"])).latent_size(3, 5) == (3, 5)
    with pytest.raises(ValueError, match="model.vae 'wan3' is not one of .'wan2.1', 'tiny', 'identity'."):
        build_vae(load_config(TOY / "dmd.yaml", ["model.vae=wan3"]))


# -------------------------------------------------------------------------------------------- sampling
def test_euler_grid_holds_the_recorded_timesteps():
    sigmas = euler_sigmas(8, 5.0, [1000.0, 937.5, 833.3333, 625.0])
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and sigmas == sorted(sigmas, reverse=True)
    # shift 5, 8 steps: 0.9375 and 0.625 are grid points, 833.3333 (float32 of 2500/3) replaces 0.83333...
    assert {0.9375, 0.8333333, 0.625} <= set(sigmas) and len(sigmas) == 9
    assert len(euler_sigmas(8, 5.0, [900.0])) == 10  # off the grid: one more Euler point


def random_toy_teacher(seed=0):
    cfg = load_config(TOY / "teacher.yaml")
    return cfg, build_dit(cfg, "toy", seed=seed).eval()


def test_teacher_sampler_records_exact_euler_states():
    cfg, teacher = random_toy_teacher()
    text = ToyTextEncoder()
    noise = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = FlowMatchSchedule(5.0).warp([1000, 750, 500, 250])
    x0, states = sample_teacher(teacher, noise, text(["red fast left", "blue any up"]), text.encode_negative("", 2),
                                num_steps=4, record=steps)  # grid: 1, .9375, .8333, .625, 0
    assert states.shape == (2, 4, 3, 3, 8, 8) and torch.equal(states[:, 0], noise)
    # The state at 937.5 is one Euler step from the noise: x + (0.9375 - 1) v with CFG 3.
    t = torch.full((2,), 1000.0)
    context = text(["red fast left", "blue any up"])
    cond, uncond = teacher(noise, t, context), teacher(noise, t, torch.zeros_like(context))
    expected = noise + (0.9375 - 1.0) * (uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(states[:, 1], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x0).all()


def test_generate_ode_pairs_script_writes_what_ode_mode_reads(tmp_path):
    teacher_file = tmp_path / "teacher.pt"
    _, teacher = random_toy_teacher()
    torch.save({"model": teacher.state_dict()}, teacher_file)
    out = tmp_path / "pairs.pt"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "generate_ode_pairs.py"), "--config_path",
                           str(TOY / "ode.yaml"), "--out", str(out), "--num_samples", "5", "--steps", "3",
                           "--batch_size", "2", f"training.teacher_ckpt={teacher_file}"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pairs = ode_pairs(out)
    states, prompts = pairs.get([0, 4])
    assert states.shape == (2, 5, 9, 3, 8, 8) and prompts == [all_prompts()[0], all_prompts()[4]]
    data = torch.load(out)
    # the student's timesteps of the config: the toy's list is not warped onto the shift-5 grid
    assert torch.equal(data["timesteps"], torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    missing = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "generate_ode_pairs.py"), "--config_path",
                              str(TOY / "ode.yaml"), "--out", str(out), "training.teacher_ckpt=nope.pt"],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert missing.returncode == 2 and "nope.pt" in missing.stderr


def test_teacher_data_sources(tmp_path):
    for i in range(3):
        torch.save({"latents": torch.full((9, 3, 8, 8), float(i)), "prompt": f"red fast {['left', 'up', 'down'][i]}"},
                   tmp_path / f"clip{i}.pt")
    folder = latent_videos(str(tmp_path), num_frames=9)
    latents, prompts = folder.get(folder.items[1:])
    assert latents[:, 0, 0, 0, 0].tolist() == [1.0, 2.0] and prompts == ["red fast up", "red fast down"]
    toy = latent_videos("toy", num_frames=6, seed=0)
    latents, prompts = toy.get(["blue static up", "red fast left"])
    assert latents.shape == (2, 6, 3, 8, 8) and len(toy.items) == 36
    with pytest.raises(FileNotFoundError, match="no latent videos"):
        latent_videos(str(tmp_path / "empty"), num_frames=9)
    with pytest.raises(ValueError, match="training.mode=teacher needs training.latent_data"):
        latent_videos("", num_frames=9)


# ----------------------------------------------------------------------------------- training modes
def make_trainer(tmp_path, config, *overrides):
    cfg = load_config(TOY / f"{config}.yaml", ["training.batch_size=4", "training.max_steps=2",
                                               "training.save_every=2", *overrides])
    models = build_training_models(cfg)
    return Trainer(cfg, models, [], tmp_path / config, dist=parallel.init_distributed())


def test_teacher_mode_trains_only_the_teacher_and_exports_it(tmp_path):
    trainer = make_trainer(tmp_path, "teacher", "training.lr_cooldown_steps=2")
    assert trainer.m.generator is None and trainer.m.critic is None and list(trainer.models) == ["teacher"]
    assert trainer.m.teacher.head.head.weight.abs().sum() == 0  # reference init: a fresh model predicts 0
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "teacher" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(e["teacher_loss"] > 0 for e in log)
    export = tmp_path / "teacher" / "checkpoint_model_000002" / "model.pt"
    cfg = load_config(TOY / "ode.yaml", [f"training.generator_ckpt={export}"])
    student = build_dit(cfg, "toy", causal=cfg.causal, weights=export)  # loads as a student's starting weights
    assert torch.equal(student.head.head.weight, trainer.m.teacher.head.head.weight)
    assert str(training_budget(trainer.tr)).startswith("teacher 2 gradient evaluations in 2 optimizer steps")
    # lr cooldown over the last 2 steps: the second (last) step ran at half the learning rate
    assert trainer.optimizers["teacher"].param_groups[0]["lr"] == pytest.approx(trainer.tr.lr / 2)
    assert [lr_factor(step, trainer.tr) for step in range(2)] == [1.0, 0.5]
    trainer.tr.lr_cooldown_steps = 0
    assert lr_factor(1, trainer.tr) == 1.0


def make_ode_trainer(tmp_path, clean_context: bool) -> tuple[Trainer, torch.Tensor]:
    """An ode-mode trainer on 6 random trajectories (4 states + the clean sample each), from a random teacher."""
    _, teacher = random_toy_teacher()
    teacher_file = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, teacher_file)
    states = torch.randn(6, 5, 9, 3, 8, 8)
    pairs = tmp_path / "pairs.pt"
    torch.save({"states": states, "prompts": all_prompts()[:6], "timesteps": torch.tensor([1.0, 2, 3, 4])}, pairs)
    trainer = make_trainer(tmp_path, "ode", f"training.generator_ckpt={teacher_file}",
                           f"training.ode_pairs_path={pairs}", f"training.ode_clean_context={clean_context}")
    return trainer, states


def test_ode_mode_regresses_each_block_at_its_own_timestep(tmp_path):
    trainer, states = make_ode_trainer(tmp_path, clean_context=False)  # the reference
    assert list(trainer.models) == ["generator"] and trainer.m.critic is None
    seen = []
    generator = trainer.m.generator
    original = generator.forward

    def spy(x, t, context, **kw):
        seen.append((x.detach().clone(), t.clone(), kw))
        return original(x, t, context, **kw)

    generator.forward = spy
    torch.manual_seed(0)
    batch = (states[:2], all_prompts()[:2])
    loss, _ = trainer.ode_loss(batch)
    x, t, kw = seen[0]
    assert kw == {"causal": True} and t.shape == (2, 9)
    steps = torch.tensor(trainer.rollout_cfg.timesteps)
    for b in range(2):
        for block in range(3):
            frames = slice(3 * block, 3 * block + 3)
            k = int((steps == t[b, 3 * block]).nonzero())
            assert (t[b, frames] == t[b, 3 * block]).all()  # one timestep per block
            assert torch.equal(x[b, frames], states[b, k, frames])  # the trajectory's state at that timestep
    assert loss > 0
    generator.forward = original
    trainer.train()
    export = torch.load(tmp_path / "ode" / "checkpoint_model_000002" / "model.pt")
    assert list(export) == ["generator"]  # the format of ode_init.pt


def test_ode_clean_context_is_a_clean_prefix_at_t0_that_carries_no_loss(tmp_path):
    trainer, states = make_ode_trainer(tmp_path, clean_context=True)
    seen = []
    original = trainer.m.generator.forward

    def spy(x, t, context, **kw):
        out = original(x, t, context, **kw)
        seen.append((x.detach().clone(), t.clone(), out.detach().clone()))
        return out

    trainer.m.generator.forward = spy
    steps = torch.tensor(trainer.rollout_cfg.timesteps).tolist()
    seen_prefixes = set()
    for seed in range(3):
        torch.manual_seed(seed)
        loss, _ = trainer.ode_loss((states, all_prompts()[:6]))
        x, t, flow = seen[-1]
        prefixes = []
        for b in range(6):
            clean = [bool((t[b, 3 * k:3 * k + 3] == 0).all()) for k in range(3)]
            k = clean.index(False)
            assert clean == [True] * k + [False] * (3 - k)  # a prefix, never the last block
            assert torch.equal(x[b, :3 * k], states[b, -1, :3 * k])  # the clean sample at t = 0
            assert all(t[b, 3 * j].item() in steps for j in range(k, 3))  # the rest at the student's timesteps
            prefixes.append(k)
        x0 = trainer.schedule.flow_to_x0(flow.float(), x.float(), t)
        error = (x0 - states[:, -1]).pow(2).flatten(2).mean(-1)  # [B, F]
        trained = torch.tensor([[f >= 3 * k for f in range(9)] for k in prefixes]).float()
        assert loss.item() == pytest.approx(((error * trained).sum() / trained.sum()).item(), rel=1e-5)
        seen_prefixes.update(prefixes)
    assert seen_prefixes == {0, 1, 2}


def test_dmd_mode_weights_by_the_configured_reward(tmp_path):
    trainer_dir = tmp_path / "dmd"
    _, teacher = random_toy_teacher()
    weights = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, weights)
    cfg = load_config(TOY / "dmd.yaml", [f"training.generator_ckpt={weights}", f"training.teacher_ckpt={weights}",
                                         f"training.critic_ckpt={weights}", "training.beta=3", "training.batch_size=2",
                                         "training.max_steps=1"])
    trainer = Trainer(cfg, build_training_models(cfg), all_prompts(), trainer_dir, dist=parallel.init_distributed())
    scored = []
    score = trainer.m.reward.score

    def recorded(pixels, prompts):
        scored.append(score(pixels, prompts)["motion"])
        return {"motion": torch.tensor([0.0, 1.0]), "other": torch.tensor([5.0, 5.0])}

    trainer.m.reward.score = recorded
    values = trainer.train_step()
    assert scored[0].shape == (2,) and "critic_loss" in values
    assert values["generator_reward_motion"] == 0.5 and values["generator_reward_other"] == 5.0
    assert values["generator_weights"] == pytest.approx((1 + torch.e ** 3) / 2)  # exp(beta * motion), not other
    trainer.tr.reward_key = "MQ"
    with pytest.raises(ValueError, match="training.reward_key='MQ' is not a score of model.reward='toy_motion'"):
        trainer.generator_loss(all_prompts()[:2])


def test_tilted_critic_weights_its_own_rollouts_and_beta0_is_plain(tmp_path, monkeypatch):
    _, teacher = random_toy_teacher()
    weights = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, weights)
    common = [f"training.generator_ckpt={weights}", f"training.teacher_ckpt={weights}",
              f"training.critic_ckpt={weights}", "training.beta=0", "training.batch_size=2", "training.max_steps=1"]
    calls = []
    real_loss = trainer_module.critic_loss
    monkeypatch.setattr(trainer_module, "critic_loss", lambda *args: calls.append(args) or real_loss(*args))
    losses = {}
    for tilt in (0.0, 1.0):
        cfg = load_config(TOY / "dmd.yaml", [*common, f"training.critic_tilt_beta={tilt}"])
        trainer = Trainer(cfg, build_training_models(cfg), all_prompts(), tmp_path / f"tilt{tilt}",
                          dist=parallel.init_distributed())
        assert (trainer.m.reward is None) == (tilt == 0)  # the reward is built only when something uses it
        scored = []
        if tilt:
            def fixed(pixels, prompts):
                scored.append(pixels)
                return {"motion": torch.tensor([0.0, 1.0])}
            trainer.m.reward.score = fixed
        torch.manual_seed(0)
        losses[tilt], info = trainer.critic_loss(all_prompts()[:2])
        flow, noise, x0, tilt_weights = calls[-1]
        if tilt:
            assert torch.equal(scored[0], x0.clamp(-1, 1))  # the reward of the critic's own rollout, decoded
            expected = torch.exp(-torch.tensor([0.0, 1.0]))
            torch.testing.assert_close(tilt_weights, expected / expected.mean())
            assert info["reward"] == pytest.approx(0.5)
        else:
            assert tilt_weights is None and info == {}
            assert torch.equal(losses[tilt], flow_matching_loss(flow, noise, x0))  # plain DMD's critic, bit for bit
    assert losses[0.0] != losses[1.0]


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_pairs_noise_and_bootstraps():
    assert torch.equal(ev.noise_for(3, (2,)), ev.noise_for(3, (2,)))
    assert len(ev.eval_prompts(("any",), 8)) == 96
    mean, low, high = ev.bootstrap_mean_ci(torch.tensor([0.0, 1.0] * 50))
    assert mean == 0.5 and low < 0.5 < high and high - low < 0.25
    videos, _ = clips(["red fast left", "red static up"], frames=30)
    drift = ev.rollout_drift(videos, ["red fast left", "red static up"], 21)
    assert drift["std_ratio"] == pytest.approx(1.0, abs=0.02) and drift["colour_accuracy"] == 1.0
    assert drift["motion_first"] == pytest.approx(0.375, abs=1e-3)  # mean of one fast and one static clip


def test_student_pipeline_streams_toy_latents():
    _, teacher = random_toy_teacher()
    cfg = load_config(TOY / "dmd.yaml")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/student.pt"
        torch.save({"generator": teacher.state_dict()}, weights)
        pipe = build_pipeline(cfg, checkpoint=weights)
        videos = ev.sample_student_videos(pipe, ["red fast left", "blue static up"], num_frames=6, sink_policy="ema")
    assert videos.shape == (2, 6, 3, 8, 8) and torch.isfinite(videos).all()
    assert pipe.generator.causal.sink_policy == cfg.causal.sink_policy  # restored after the override


# ----------------------------------------------------------------------------------------------- smoke
@pytest.mark.slow
def test_toy_world_smoke_runs_every_stage(tmp_path):
    """CI runs the smoke (every stage, a few steps); the gates are printed, not enforced."""
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "toy_world.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] and {g["stage"] for g in results["gates"]} == {"teacher", "ode init", "dmd", "re-dmd",
                                                                          "long rollout"}
    assert set(results["long_rollout"]) == {"none", "static", "ema"}
    for name in ("report.md", "losses.png", "motion_any.png", "long_rollout.png", "frames.png"):
        assert (out / name).stat().st_size > 0, name
    assert "re-dmd" in proc.stdout and "fail (smoke)" in proc.stdout or "PASS" in proc.stdout
    assert any(g["gate"].endswith("direction accuracy (fast)") for g in results["gates"])

    # The Re-DMD study's code path, on the same folder (teacher, ODE pairs and ODE init are reused)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "toy_world.py"), "--smoke", "--study", "redmd",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reuse ") >= 3  # teacher is the smoke's own; pairs and ODE init are reused
    study = json.loads((out / "results_redmd.json").read_text())
    assert set(study["table"]) == {"dmd", "tilt +1", "tilt -1", "re-dmd", "control", "control cfg"}
    assert set(study["teacher_fast_fraction"]) == {"teacher", "control teacher", "teacher, guidance +1"}
    assert set(study["curves"]["tilt +1"]) == {"1", "2"}  # fast fraction after each saved export
    assert {"predicted_fast_fraction", "ci95", "fast_fraction", "direction"} <= set(study["table"]["tilt +1"])
    assert [g["gate"].split(" (")[0].split(":")[0] for g in study["gates"]][:4] == [
        "positive control", "positive control", "tilt +1 vs dmd", "tilt -1 vs dmd"]
    assert (out / "redmd.md").stat().st_size > 0 and (out / "redmd_fast_fraction.png").stat().st_size > 0


def test_a_relative_out_folder_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    """The trainings run in the repository root: a relative --out must not land there."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import toy_world

    monkeypatch.chdir(tmp_path)
    stages = toy_world.Stages(toy_world.parse_args(["--out", "runs/toy"]))
    assert stages.out == tmp_path / "runs" / "toy" and stages.out.is_dir()
    command = stages._train_command("dmd", stages.out / "dmd", [])
    assert command[command.index("--logdir") + 1] == str(tmp_path / "runs" / "toy" / "dmd")


def test_a_study_cut_short_reuses_finished_runs_and_reports_what_is_missing(tmp_path, capsys):
    """Runs that exported their last step count as finished (a stopped study's are reused, not retrained);
    --evaluate_only takes only those; a method without a finished run is a failed gate, never a silent pass."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import toy_world

    run = tmp_path / "redmd_dmd_seed0"
    for step in (2, 4):
        (run / f"checkpoint_model_{step:06d}").mkdir(parents=True)
        (run / f"checkpoint_model_{step:06d}" / "model.pt").write_bytes(b"x")
    assert toy_world.finished(run, 4) and not toy_world.finished(run, 6) and not toy_world.finished(tmp_path, 4)
    args = toy_world.parse_args(["--out", str(tmp_path), "--study", "redmd"])
    (export,) = toy_world.Stages(args).train([("redmd_dmd_seed0", "dmd", ["training.max_steps=4"])])
    assert export.read_bytes() == b"x" and "reuse" in capsys.readouterr().out  # not retrained
    assert toy_world.main(["--out", str(tmp_path), "--evaluate_only"]) == 2
    assert "add --study redmd" in capsys.readouterr().err
    # --methods picks which runs the study trains (the positive control alone first); dmd is always one of them
    assert toy_world.main(["--out", str(tmp_path), "--study", "redmd", "--methods", "control"]) == 2
    assert "dmd must be one of them" in capsys.readouterr().err
    assert toy_world.main(["--out", str(tmp_path), "--study", "redmd", "--methods", "dmd,tilt+2"]) == 2
    assert "'tilt+2' is not one of dmd, tilt +1" in capsys.readouterr().err
    # --ode_guidance reaches the ODE pairs' sampler (the student can start at the teacher DMD distils toward)
    commands = []
    stages = toy_world.Stages(toy_world.parse_args(["--out", str(tmp_path / "g"), "--ode_guidance", "1"]))
    stages.run_all = lambda jobs: commands.extend(cmd for _, cmd, _ in jobs)
    stages.ode_pairs(tmp_path / "teacher.pt")
    assert commands[-1][-1] == "training.guidance_scale=1.0"
    (tmp_path / "control_teacher").mkdir()
    (tmp_path / "control_teacher" / "export.pt").write_bytes(b"c")  # reused: no training here
    for name in ("redmd_dmd_seed1", "redmd_tilt+1_seed1", "redmd_control_seed1"):
        (tmp_path / name / "checkpoint_model_000008").mkdir(parents=True)
        (tmp_path / name / "checkpoint_model_000008" / "model.pt").write_bytes(b"x")
    args = toy_world.parse_args(["--out", str(tmp_path), "--study", "redmd", "--evaluate_only", "--seeds", "2",
                                 "--gen_updates", "4", "--methods", "dmd,control"])
    control, runs = toy_world.redmd_runs(toy_world.Stages(args), tmp_path / "teacher.pt", tmp_path / "ode.pt")
    assert control.read_bytes() == b"c"
    assert sorted(runs) == [("control", 1), ("dmd", 1)]  # tilt +1 finished too, but was not asked for
    # the guidance control: plain DMD toward the same teacher with one more unit of guidance than the study's (its
    # override comes last, so it wins); no control teacher is trained when the fine-tuned control is not asked for
    jobs = []
    stages = toy_world.Stages(toy_world.parse_args(["--out", str(tmp_path / "c"), "--study", "redmd", "--seeds", "1",
                                                    "--methods", "dmd,control cfg", "training.guidance_scale=0.5"]))
    stages.train = lambda todo: jobs.extend(todo) or [tmp_path / "c" / name / "export.pt" for name, _, _ in todo]
    control, runs = toy_world.redmd_runs(stages, tmp_path / "teacher.pt", tmp_path / "ode.pt")
    assert control is None and [name for name, _, _ in jobs] == ["redmd_dmd_seed0", "redmd_controlcfg_seed0"]
    guidance = [load_config(toy_world.CONFIGS["dmd"], overrides).training.guidance_scale for _, _, overrides in jobs]
    assert guidance == [0.5, 1.5]
    entry = {"seeds": [0], "fast_fraction": [0.6], "dmd_fast_fraction": [0.5], "difference": 0.1, "ci95": [0.05, 0.15],
             "predicted_fast_fraction": 0.7}
    rows = toy_world.redmd_gates({"table": {"dmd": entry, "tilt +1": entry}, "teacher_fast_fraction": {}, "beta": 3})
    verdicts = {r["gate"].split(" (")[0].split(":")[0]: r["pass"] for r in rows}
    assert verdicts == {"control": False, "control cfg": False, "tilt -1": False, "re-dmd": False,
                        "tilt +1 vs dmd": True}


def test_a_failed_stage_stops_the_trainings_running_beside_it(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import toy_world

    stages = toy_world.Stages(toy_world.parse_args(["--out", str(tmp_path), "--jobs", "2"]))
    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(60)"]
    failing = [sys.executable, "-c", "import sys, time; time.sleep(2); print('boom'); sys.exit(3)"]
    started = time.time()
    with pytest.raises(SystemExit, match=r"error: fails failed \(exit 3\)(.|\n)*boom"):
        stages.run_all([("sleeps", sleeper, tmp_path / "a.log"), ("fails", failing, tmp_path / "b.log")])
    assert time.time() - started < 30  # not waited for
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(int(pid_file.read_text()), 0)
