"""Re-DMD trainer on tiny models: updates, accumulation, EMA, exact resume, NaN handling, bad input, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reward_forcing import checkpoints as ckpt
from reward_forcing.build import build_training_models
from reward_forcing.config import load_config
from reward_forcing.training import distributed as dist_utils
from reward_forcing.training.trainer import Trainer, TrainingDiverged
from conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny.yaml"
PROMPTS = ["a fox runs", "a car drives", "waves crash", "a bird flies", "a dancer spins"]


def make_trainer(logdir, *overrides, resume=False):
    cfg = load_config(TINY, list(overrides))
    models = build_training_models(cfg)
    return Trainer(cfg, models, PROMPTS, logdir, dist=dist_utils.init_distributed(), resume=resume)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_updates_student_and_critic_only(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {name: state(getattr(trainer.m, name)) for name in ("generator", "critic", "teacher")}
    trainer.train()
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    gen_logs = [entry for entry in logs if "generator_loss" in entry]
    assert len(gen_logs) == 2  # dfake_gen_update_ratio 2
    for entry in logs:
        assert all(isinstance(v, str) or torch.isfinite(torch.tensor(float(v))) for v in entry.values())
    for key in ("generator_reward_mq", "generator_reward_vq", "generator_weights", "generator_dmd_grad_norm"):
        assert key in gen_logs[0]
    after = {name: state(getattr(trainer.m, name)) for name in ("generator", "critic", "teacher")}
    for name, changed in (("generator", True), ("critic", True), ("teacher", False)):
        diff = max((after[name][k] - before[name][k]).abs().max().item() for k in before[name])
        assert (diff > 0) == changed, (name, diff)
    # Checkpoints: resumable folders and reference-format exports with the EMA (started at step 2).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    export = torch.load(tmp_path / "checkpoint_model_000004" / "model.pt", weights_only=True)
    assert set(export) == {"generator", "critic", "generator_ema"}
    ema = ckpt.select_generator_weights(export, use_ema=True)
    assert torch.equal(ema["head.head.weight"], trainer.ema.full_state_dict(trainer.m.generator)["head.head.weight"])
    gen = ckpt.select_generator_weights(export)
    assert torch.equal(gen["head.head.weight"], trainer.m.generator.state_dict()["head.head.weight"])


def test_one_optimizer_step_per_accumulated_batch(tmp_path):
    trainer = make_trainer(tmp_path, "training.gradient_accumulation_steps=3", "training.save_every=100",
                           "training.beta=0")
    calls = {"gen_step": 0, "critic_step": 0, "gen_loss": 0, "critic_loss": 0}
    for opt, key in ((trainer.gen_opt, "gen_step"), (trainer.critic_opt, "critic_step")):
        original = opt.step

        def counted(*a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(*a, **k)
        opt.step = counted
    for name, key in (("generator_loss", "gen_loss"), ("critic_loss", "critic_loss")):
        original = getattr(trainer, name)

        def counted_loss(prompts, _original=original, _key=key):
            calls[_key] += 1
            return _original(prompts)
        setattr(trainer, name, counted_loss)
    trainer.train()
    assert calls == {"gen_step": 2, "critic_step": 4, "gen_loss": 6, "critic_loss": 12}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.train()
    part = make_trainer(tmp_path / "part", "training.max_steps=2")
    part.train()
    resumed = make_trainer(tmp_path / "part", resume=True)
    assert resumed.step == 2 and resumed.ema is None  # the EMA starts at step 2, after this save
    resumed.train()
    for name in ("generator", "critic"):
        a, b = state(getattr(full.m, name)), state(getattr(resumed.m, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ea, eb = full.ema.full_state_dict(full.m.generator), resumed.ema.full_state_dict(resumed.m.generator)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "training.max_steps=6")
    original = trainer.critic_loss

    def poisoned(prompts):
        loss, info = original(prompts)
        return (loss * float("nan") if trainer.step == 3 else loss), info
    trainer.critic_loss = poisoned
    with pytest.raises(TrainingDiverged, match="critic loss is nan at step 3") as err:
        trainer.train()
    assert "step_000002" in str(err.value)
    resumed = make_trainer(tmp_path, "training.max_steps=6", resume=True)
    assert resumed.step == 2


def run_train(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--config_path", TINY, "--disable-wandb", f"training.data_path={prompts}", "training.max_steps=6"]
    assert run_train(*common, "--logdir", tmp_path / "full").returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *map(str, common), "--logdir",
                             str(tmp_path / "killed"), "training.max_steps=1000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step_000002").is_dir():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = run_train(*common, "--logdir", tmp_path / "killed", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoint_model_000006" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint_model_000006" / "model.pt", weights_only=True)
    for part in ("generator", "critic", "generator_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("override,needle", [
    ("model.random_init=false", "ode_init.pt"),
    ("training.data_path=/nonexistent/prompts.txt", "/nonexistent/prompts.txt"),
])
def test_bad_input_is_reported(tmp_path, override, needle):
    result = run_train("--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                       f"checkpoint_root={tmp_path / 'ckpts'}", f"training.generator_ckpt={tmp_path / 'ode_init.pt'}",
                       override)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    if override.startswith("model."):
        assert "download_checkpoints.sh --train" in result.stderr


def test_missing_teacher_and_reward_folders(tmp_path):
    from reward_forcing.build import build_dit, build_reward

    cfg = load_config(TINY, ["model.random_init=false", f"checkpoint_root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"Wan2.1-T2V-14B.*download_checkpoints.sh --train"):
        build_dit(cfg, "14B", what="teacher")
    with pytest.raises(FileNotFoundError, match=r"(?s)VideoReward.*download_checkpoints.sh --train"):
        build_reward(load_config(TINY, [f"checkpoint_root={tmp_path}", "model.reward=videoreward"]))


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = run_train("--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                       f"training.data_path={empty}")
    assert result.returncode == 2 and "no prompts" in result.stderr


def test_torchrun_two_ranks_gloo(tmp_path):
    """2 CPU processes with FSDP2 over gloo: finite losses, weights change, ranks agree, checkpoint reloads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "torchrun_train_check.py"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks["step"] == 4 and ranks["ranks"][0] == ranks["ranks"][1]
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["critic_loss"])) for e in logs)
    assert any("generator_loss" in e for e in logs)
    export = torch.load(tmp_path / "checkpoint_model_000004" / "model.pt", weights_only=True)
    from reward_forcing.models.wan import WanModel, init_random_
    reloaded = WanModel.from_flavor("tiny")
    ckpt.load_weights(reloaded, ckpt.select_generator_weights(export))
    initial = init_random_(WanModel.from_flavor("tiny"), seed=0).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in reloaded.state_dict().items())
    # The resumable checkpoint reloads in one process (DCP reshards).
    trainer = make_trainer(tmp_path / "one", resume=False)
    dist_utils.load_training_state(tmp_path / "checkpoints" / "step_000004",
                                   models={"generator": trainer.m.generator}, restore_rng=False)
    assert torch.equal(trainer.m.generator.state_dict()["head.head.weight"], reloaded.state_dict()["head.head.weight"])


def test_sample_videos_and_global_batch(tmp_path):
    from reward_forcing.video_io import read_video

    trainer = make_trainer(tmp_path, "training.sample_every=2", "training.global_batch_size=2", "training.beta=0")
    assert trainer.batch_size == 2
    trainer.train()
    frames, fps = read_video(tmp_path / "samples" / "step_000002.mp4")
    assert frames.shape == (1 + 4 * 8, 48, 80, 3) and fps == 16
    result = run_train("--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                       "training.global_batch_size=3", "training.gradient_accumulation_steps=2")
    assert result.returncode == 2 and "global_batch_size=3 is not divisible" in result.stderr


def test_wandb_is_optional(tmp_path):
    """Asking for wandb works with or without the package (WANDB_MODE=disabled in tests): training goes on and
    the JSONL log is written either way."""
    cfg = load_config(TINY, ["training.max_steps=1", "training.beta=0"])
    trainer = Trainer(cfg, build_training_models(cfg), PROMPTS, tmp_path, dist=dist_utils.init_distributed(),
                      use_wandb=True)
    trainer.train()
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
