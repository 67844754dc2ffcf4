"""inference.py end to end on the tiny config, checkpoint formats, torchrun splitting, and every bad input."""
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reward_forcing import checkpoints as ckpt
from reward_forcing import file_io, video_io
from reward_forcing.build import build_generator
from reward_forcing.config import load_config
from reward_forcing.models.wan import WanModel, init_random_
from reward_forcing.video_io import read_video
from conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("inference_cli", REPO_ROOT / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["inference_cli"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a fox / in the snow\na red car drives by\n\nwaves on rocks\n")
    return path


def run(cli, *args):
    return cli.main([str(a) for a in args])


def test_tiny_end_to_end_writes_81_frame_videos(cli, prompts, tmp_path):
    out = tmp_path / "videos"
    assert run(cli, "--config_path", TINY, "--data_path", prompts, "--output_folder", out) == 0
    files = sorted(p.name for p in out.glob("*.mp4"))
    # line indices are kept (the blank line 2 is skipped); no "/" from the prompt leaks into names
    assert files == ["0000-a-fox-in-the-snow-s0.mp4", "0001-a-red-car-drives-by-s0.mp4", "0003-waves-on-rocks-s0.mp4"]
    frames, fps = read_video(out / files[0])
    assert frames.shape == (81, 48, 80, 3) and fps == 16
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_samples_and_extended_prompts(cli, prompts, tmp_path):
    ext = tmp_path / "ext.txt"
    ext.write_text("a fox walking through deep fresh snow\nx\n\ny\n")
    out = tmp_path / "v"
    assert run(cli, "--config_path", TINY, "--data_path", prompts, "--extended_prompt_path", ext,
               "--output_folder", out, "--num_output_frames", 3, "--num_samples", 2) == 0
    s0, _ = read_video(out / "0000-a-fox-in-the-snow-s0.mp4")
    s1, _ = read_video(out / "0000-a-fox-in-the-snow-s1.mp4")
    assert s0.shape == (9, 48, 80, 3) and not (s0 == s1).all()


def test_torchrun_ranks_split_prompts_without_dropping(cli, prompts, tmp_path, monkeypatch):
    out = tmp_path / "v"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run(cli, "--config_path", TINY, "--data_path", prompts, "--output_folder", out,
                   "--num_output_frames", 3) == 0
    assert len(list(out.glob("*.mp4"))) == 3


@pytest.mark.slow
def test_torchrun_pipeline_parallel_writes_each_video_once_as_one_process(cli, tmp_path):
    """Two gloo ranks, the toy student's layers split between them: rank 0 writes every video, and the frames
    equal those of one plain process."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("red fast right\nblue any up\n")
    args = ["--config_path", "configs/toy/student.yaml", "--data_path", str(prompts), "--num_output_frames", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "inference.py", *args, "--output_folder", str(tmp_path / "two"), "--pipeline_parallel"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "pipeline stage 1 streamed every video; rank 0 wrote them" in two.stderr
    assert run(cli, *args, "--output_folder", tmp_path / "one") == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.mp4"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.mp4")) and len(names) == 2
    for name in names:
        assert (read_video(tmp_path / "one" / name)[0] == read_video(tmp_path / "two" / name)[0]).all()


def _tiny_state(seed):
    return init_random_(WanModel.from_flavor("tiny"), seed=seed).state_dict()


def test_checkpoint_formats_and_use_ema(cli, prompts, tmp_path):
    cfg = load_config(TINY)
    released = {f"model.{k}": v for k, v in _tiny_state(1).items()}  # flat, like rewardforcing.pt
    torch.save(released, tmp_path / "rewardforcing.pt")
    model = build_generator(cfg, checkpoint=tmp_path / "rewardforcing.pt")
    assert torch.equal(model.state_dict()["head.head.weight"], released["model.head.head.weight"])

    ema = _tiny_state(2)
    ckpt.export_reference_checkpoint(tmp_path / "trainer.pt", _tiny_state(3), _tiny_state(4), ema)
    picked = build_generator(cfg, checkpoint=tmp_path / "trainer.pt", use_ema=True)
    assert torch.equal(picked.state_dict()["blocks.0.self_attn.q.weight"], ema["blocks.0.self_attn.q.weight"])

    from safetensors.torch import save_file
    save_file(_tiny_state(5), str(tmp_path / "gen.safetensors"))
    assert run(cli, "--config_path", TINY, "--checkpoint_path", tmp_path / "gen.safetensors", "--data_path",
               prompts, "--output_folder", tmp_path / "v", "--num_output_frames", 3) == 0

    ckpt.export_reference_checkpoint(tmp_path / "no_ema.pt", _tiny_state(3))
    with pytest.raises(ValueError, match="generator_ema"):
        build_generator(cfg, checkpoint=tmp_path / "no_ema.pt", use_ema=True)


def error_of(cli, capsys, *args):
    assert run(cli, *args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("bad, named", [
    (["--num_output_frames", "0"], "got 0"),
    (["--num_output_frames", "-3"], "got -3"),
    (["--num_output_frames", "21.5"], "'21.5' is not a whole number"),
    (["--num_samples", "0"], "--num_samples: must be >= 1"),
    (["--seed", "-1"], "--seed: must be in [0, 9223372036854775808)"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["video.num_output_frames=0"], "video.num_output_frames: 0 latent frames is not a positive multiple"),
    (["video.height=0"], "must be positive multiples of 16"),
    (["video.fps=0"], "video.fps: must be >= 1"),
])
def test_bad_values_end_in_one_line_before_anything_is_created(cli, capsys, prompts, tmp_path, bad, named):
    out = tmp_path / "v"
    err = error_of(cli, capsys, "--config_path", TINY, "--data_path", prompts, "--output_folder", out, *bad)
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["gen.safetensors", "gen.pt"])
def test_truncated_checkpoint_is_named_in_one_line(cli, capsys, prompts, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(_tiny_state(1), str(path))
    else:
        torch.save(_tiny_state(1), path)
    path.write_bytes(path.read_bytes()[:-100])
    out = tmp_path / "v"
    err = error_of(cli, capsys, "--config_path", TINY, "--checkpoint_path", path, "--data_path", prompts,
                   "--output_folder", out)
    assert err.startswith(f"error: {path} is not a valid ") and "truncated or corrupt" in err
    assert err.count("\n") == 1 and "re-download" in err
    assert not out.exists()


def test_full_disk_fails_the_run_and_leaves_no_video(cli, capsys, caplog, tmp_path, monkeypatch):
    def temp_on_full_disk(path, **kwargs):  # ffmpeg writes to /dev/full: every write fails with ENOSPC
        tmp = file_io.temp_sibling(path, **kwargs)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to simulate a full disk")
    monkeypatch.setattr(video_io, "temp_sibling", temp_on_full_disk)
    caplog.set_level(logging.INFO, logger="inference")
    (tmp_path / "p.txt").write_text("a cat\n")
    out = tmp_path / "v"
    assert run(cli, "--config_path", TINY, "--data_path", tmp_path / "p.txt", "--output_folder", out,
               "--num_output_frames", 3) == 1
    err = capsys.readouterr().err
    assert "0000-a-cat-s0.mp4" in err and "No space left on device" in err and err.count("\n") == 1
    assert "wrote" not in caplog.text and "done" not in caplog.text
    assert list(out.iterdir()) == []


def test_leftovers_of_a_killed_run_are_cleaned_or_reported(cli, caplog, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    out = tmp_path / "v"
    ours = file_io.temp_sibling(out / "0000-a-cat-s0.mp4", suffix=".mp4")  # what SIGKILL mid-video leaves
    theirs = file_io.temp_sibling(out / "0007-other-run-s0.mp4", suffix=".mp4")
    caplog.set_level(logging.INFO, logger="inference")
    assert run(cli, "--config_path", TINY, "--data_path", tmp_path / "p.txt", "--output_folder", out,
               "--num_output_frames", 3) == 0
    assert not ours.exists() and f"removed {ours}" in caplog.text
    assert theirs.exists() and "1 unfinished file(s)" in caplog.text and theirs.name in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [theirs.name, "0000-a-cat-s0.mp4"]


def test_sigterm_mid_video_leaves_no_temporary_file(tmp_path):
    # A real process: before the handler existed SIGTERM killed the interpreter outright, which in process would
    # take pytest down with it; and only a separate process shows the exit status a scheduler sees.
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    out = tmp_path / "v"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "inference.py"), "--config_path", TINY, "--data_path",
                             str(tmp_path / "p.txt"), "--output_folder", str(out), "--num_output_frames", "60"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not file_io.leftover_temps(out):  # the first video is being written
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no video was started in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err
    assert list(out.iterdir()) == []  # neither a temporary file nor a half video under the final name


def test_missing_checkpoint_root(cli, capsys, prompts, tmp_path):
    err = error_of(cli, capsys, "--config_path", REPO_ROOT / "configs" / "reward_forcing.yaml", "--data_path",
                   prompts, "--output_folder", tmp_path / "v", f"checkpoint_root={tmp_path / 'nowhere'}")
    assert "nowhere" in err and "download_checkpoints.sh" in err


def test_missing_checkpoint_file(cli, capsys, prompts, tmp_path):
    err = error_of(cli, capsys, "--config_path", TINY, "--checkpoint_path", tmp_path / "missing.pt",
                   "--data_path", prompts, "--output_folder", tmp_path / "v")
    assert "missing.pt" in err and "download_checkpoints.sh" in err


def test_wrong_checkpoint_is_summarised(cli, capsys, prompts, tmp_path):
    state = _tiny_state(1)
    state.pop("head.head.weight")
    state.update({f"extra.layer{i}.weight": torch.zeros(1) for i in range(50)})
    torch.save(state, tmp_path / "wrong.pt")
    err = error_of(cli, capsys, "--config_path", TINY, "--checkpoint_path", tmp_path / "wrong.pt", "--data_path",
                   prompts, "--output_folder", tmp_path / "v")
    assert "head.head.weight" in err and "50" in err
    assert len(err) < 1500 and "extra.layer49.weight" not in err  # summarised, not dumped


def test_frames_not_a_multiple_of_the_block(cli, capsys, prompts, tmp_path):
    err = error_of(cli, capsys, "--config_path", TINY, "--data_path", prompts, "--output_folder", tmp_path / "v",
                   "--num_output_frames", 20)
    assert "20" in err and "multiple" in err


def test_empty_prompt_file(cli, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    err = error_of(cli, capsys, "--config_path", TINY, "--data_path", tmp_path / "empty.txt", "--output_folder",
                   tmp_path / "v")
    assert "no prompts" in err and "empty.txt" in err


def test_unwritable_output_folder(cli, capsys, prompts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = error_of(cli, capsys, "--config_path", TINY, "--data_path", prompts, "--output_folder", blocker / "sub")
    assert "cannot write to --output_folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(cli, capsys, prompts, tmp_path):
    err = error_of(cli, capsys, "--config_path", TINY, "--data_path", prompts, "--output_folder", tmp_path / "v",
                   "--device", "cuda")
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_main_leaves_grad_mode_alone(cli, prompts, tmp_path):
    assert torch.is_grad_enabled()
    assert run(cli, "--config_path", TINY, "--data_path", prompts, "--output_folder", tmp_path / "v",
               "--num_output_frames", 3) == 0
    assert torch.is_grad_enabled()
