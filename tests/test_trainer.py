"""Re-DMD trainer on tiny models: updates, accumulation, budget, logged means, EMA, exact resume (also after a
killed save and on another number of ranks), keep-last-K, NaN handling, bad input, train.py, torchrun."""
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reward_forcing import checkpoints as ckpt
from reward_forcing.config import load_config
from reward_forcing.training import checkpointing, parallel
from reward_forcing.training import trainer as trainer_module
from reward_forcing.training.build import build_training_models
from reward_forcing.training.run import training_budget
from reward_forcing.training.trainer import Trainer, TrainingDiverged
from conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny.yaml"
PROMPTS = ["a fox runs", "a car drives", "waves crash", "a bird flies", "a dancer spins"]


def make_trainer(logdir, *overrides, resume=False):
    cfg = load_config(TINY, list(overrides))
    models = build_training_models(cfg)
    return Trainer(cfg, models, PROMPTS, logdir, dist=parallel.init_distributed(), resume=resume)


def load_train_script():
    """train.py as a module, so its error paths run in this process (no interpreter start-up per case)."""
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_updates_student_and_critic_only(tmp_path):
    trainer = make_trainer(tmp_path, "training.keep_last_checkpoints=1")
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
    # Checkpoints: the last resumable folder (keep_last_checkpoints=1), every reference-format export, with the
    # EMA from step 2 on.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_model_*")) == ["checkpoint_model_000002",
                                                                           "checkpoint_model_000004"]
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
    for opt, key in ((trainer.optimizers["generator"], "gen_step"), (trainer.optimizers["critic"], "critic_step")):
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
    budget = training_budget(trainer.tr)  # what train.py prints at the start
    assert (budget.generator_steps, budget.critic_steps, budget.generator_grad_evals, budget.critic_grad_evals) \
        == (calls["gen_step"], calls["critic_step"], calls["gen_loss"], calls["critic_loss"])


def test_budget_of_the_shipped_configs():
    """Ours: 601 critic steps of 8 micro-batches, a generator step every 5. The reference (docs/differences.md):
    601 critic and 16 generator gradient evaluations; configs/reward_forcing_reference_budget.yaml matches them."""
    ours = training_budget(load_config(REPO_ROOT / "configs" / "reward_forcing.yaml").training)
    assert (ours.critic_grad_evals, ours.critic_steps, ours.generator_grad_evals, ours.generator_steps) == \
        (4808, 601, 968, 121)
    matched = training_budget(load_config(REPO_ROOT / "configs" / "reward_forcing_reference_budget.yaml").training)
    assert (matched.critic_grad_evals, matched.generator_grad_evals) == (601, 16)
    assert str(ours).startswith("critic 4808 gradient evaluations in 601 optimizer steps, generator 968")


def test_logged_values_are_means_over_micro_batches(tmp_path):
    trainer = make_trainer(tmp_path, "training.gradient_accumulation_steps=3", "training.max_steps=1",
                           "training.save_every=100")
    scored, losses = [], []
    score = trainer.m.reward.score

    def recorded_score(pixels, prompts):
        out = score(pixels, prompts)
        scored.append(out["MQ"].double())
        return out
    trainer.m.reward.score = recorded_score
    critic = trainer.critic_loss

    def recorded_critic(prompts):
        loss, info = critic(prompts)
        losses.append(loss.item())
        return loss, info
    trainer.critic_loss = recorded_critic
    values = trainer.train_step()
    assert len(scored) == 3 and len(losses) == 3
    assert values["generator_reward_mq"] == pytest.approx(torch.cat(scored).mean().item(), rel=1e-9)
    assert values["critic_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert len({s.item() for s in scored}) == 3  # different rollouts, so the last one alone would differ


def test_metric_lines_are_written_above_the_progress_bar(tmp_path, monkeypatch, caplog):
    written = []
    monkeypatch.setattr(trainer_module.tqdm, "write", classmethod(lambda cls, s, *a, **k: written.append(s)))
    console = logging.StreamHandler(sys.stderr)  # what train.py's logging.basicConfig installs
    root = logging.getLogger()
    root.addHandler(console)
    caplog.set_level(logging.INFO)
    try:
        make_trainer(tmp_path, "training.max_steps=1", "training.beta=0").train()
    finally:
        root.removeHandler(console)
    assert any("critic_loss=" in line and "step=1" in line for line in written), written


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


def test_resume_after_a_killed_save(tmp_path, monkeypatch):
    """A save killed mid-way (a signal, no error handling) leaves a temporary folder: --resume takes the last
    complete checkpoint and removes the leftover."""
    trainer = make_trainer(tmp_path, "training.beta=0")
    real_save = checkpointing.dcp.save

    def killed_at_step_4(state, *, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if trainer.step == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpointing.dcp, "save", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # step_000002 and the leftover
    resumed = make_trainer(tmp_path, "training.beta=0", resume=True)
    assert resumed.step == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]


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


def train_in_process(capsys, *args) -> tuple[int, str]:
    """train.py's main() in this process: (exit code, what it wrote to stderr)."""
    code = load_train_script().main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def one_thread():
    """One torch thread here, as in a process started with OMP_NUM_THREADS=1: bit-identical float reductions in
    both (with more threads, how this process's pool was set up earlier changes the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, capsys, one_thread):
    """The run to kill is a process of its own (SIGKILL: no handler, no cleanup runs); the others run here."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--config_path", TINY, "--disable-wandb", f"training.data_path={prompts}", "training.max_steps=6"]
    assert train_in_process(capsys, *common, "--logdir", tmp_path / "full")[0] == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *map(str, common), "--logdir",
                             str(tmp_path / "killed"), "training.max_steps=1000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step_000002").is_dir():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, err = train_in_process(capsys, *common, "--logdir", tmp_path / "killed", "--resume")
    assert code == 0, err[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoint_model_000006" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint_model_000006" / "model.pt", weights_only=True)
    for part in ("generator", "critic", "generator_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("override,needle", [
    ("model.random_init=false", "ode_init.pt"),
    ("training.data_path=/nonexistent/prompts.txt", "/nonexistent/prompts.txt"),
])
def test_bad_input_is_reported(tmp_path, capsys, override, needle):
    code, err = train_in_process(capsys, "--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                                 f"checkpoint_root={tmp_path / 'ckpts'}",
                                 f"training.generator_ckpt={tmp_path / 'ode_init.pt'}", override)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    if override.startswith("model."):
        assert "download_checkpoints.sh --train" in err
    assert not (tmp_path / "x").exists()


def test_logdir_with_a_run_is_refused_before_models_are_built(tmp_path, monkeypatch, capsys, caplog):
    train = load_train_script()
    monkeypatch.setattr(train, "build_training_models", lambda *a, **k: pytest.fail("models were built"))
    logdir = tmp_path / "run"
    (logdir / "checkpoints" / "step_000002").mkdir(parents=True)
    (logdir / "log.jsonl").write_text("earlier run\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--config_path", str(TINY), "--logdir", str(logdir), "--disable-wandb", f"training.data_path={prompts}",
            "training.max_steps=1", "training.beta=0"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0], err
    assert all(flag in err[0] for flag in ("--resume", "--overwrite", "--logdir"))
    assert (logdir / "log.jsonl").read_text() == "earlier run\n" and (logdir / "checkpoints" / "step_000002").is_dir()
    assert not (logdir / "config.yaml").exists()
    # --overwrite starts afresh: nothing of the earlier run is left to mix with the new one.
    monkeypatch.setattr(train, "build_training_models", build_training_models)
    caplog.set_level(logging.INFO)
    assert train.main(args + ["--overwrite"]) == 0
    assert "training budget: critic 1 gradient evaluations in 1 optimizer steps, generator 1" in caplog.text
    assert json.loads((logdir / "log.jsonl").read_text())["step"] == 1
    assert [p.name for p in (logdir / "checkpoints").iterdir()] == ["step_000001"]


def test_missing_teacher_and_reward_folders(tmp_path):
    from reward_forcing.build import build_dit, build_reward

    cfg = load_config(TINY, ["model.random_init=false", f"checkpoint_root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"Wan2.1-T2V-14B.*download_checkpoints.sh --train"):
        build_dit(cfg, "14B", what="teacher")
    with pytest.raises(FileNotFoundError, match=r"(?s)VideoReward.*download_checkpoints.sh --train"):
        build_reward(load_config(TINY, [f"checkpoint_root={tmp_path}", "model.reward=videoreward"]))


def test_empty_prompt_file_and_bad_training_values(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, err = train_in_process(capsys, "--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                                 f"training.data_path={empty}")
    assert code == 2 and "no prompts" in err
    code, err = train_in_process(capsys, "--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                                 "training.save_every=0")
    assert code == 2 and "training.save_every: must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path):
    """2 CPU processes with FSDP2 over gloo (torchrun starts them): finite losses, weights change, ranks agree, and
    the run resumes in one process."""
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
    assert ranks["ranks"][0]["sharded"]  # train.py's parallelize() sharded the generator
    # The 2-rank run resumes in one process: DCP reshards and the prompt sampler re-partitions the epoch.
    resumed = make_trainer(tmp_path, "training.max_steps=5", resume=True)
    assert resumed.step == 4 and resumed.ema is not None
    assert torch.equal(resumed.m.generator.state_dict()["head.head.weight"], reloaded.state_dict()["head.head.weight"])
    resumed.train()
    assert resumed.step == 5


def test_sample_videos_and_global_batch(tmp_path, capsys):
    from reward_forcing.video_io import read_video

    trainer = make_trainer(tmp_path, "training.sample_every=2", "training.global_batch_size=2", "training.beta=0")
    assert trainer.batch_size == 2
    trainer.train()
    frames, fps = read_video(tmp_path / "samples" / "step_000002.mp4")
    assert frames.shape == (1 + 4 * 8, 48, 80, 3) and fps == 16
    code, err = train_in_process(capsys, "--config_path", TINY, "--logdir", tmp_path / "x", "--disable-wandb",
                                 "training.global_batch_size=3", "training.gradient_accumulation_steps=2")
    assert code == 2 and "global_batch_size=3 is not divisible" in err


def test_wandb_is_optional(tmp_path):
    """Asking for wandb works with or without the package (WANDB_MODE=disabled in tests): training goes on and
    the JSONL log is written either way."""
    cfg = load_config(TINY, ["training.max_steps=1", "training.beta=0"])
    trainer = Trainer(cfg, build_training_models(cfg), PROMPTS, tmp_path, dist=parallel.init_distributed(),
                      use_wandb=True)
    trainer.train()
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
