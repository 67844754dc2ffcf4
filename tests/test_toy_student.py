"""The committed toy student (configs/toy/student.yaml) still does its job, its CLI writes watchable videos, and the
studies of the live features run (scripts/toy_studies.py --smoke)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.toy import evaluate as ev
from reward_forcing.toy import studies
from reward_forcing.video_io import read_video
from conftest import REPO_ROOT

STUDENT = REPO_ROOT / "configs" / "toy" / "student.yaml"


@pytest.fixture(scope="module")
def student():
    return build_pipeline(load_config(STUDENT))


def test_committed_student_draws_the_prompted_colour_moving_the_prompted_way(student):
    prompts = ev.eval_prompts(("static", "fast"), 1)  # every colour x direction, static and fast
    with torch.no_grad():
        videos = ev.sample_student_videos(student, prompts)
    groups = ev.group_metrics(videos, prompts)
    assert groups["all"].colour_accuracy >= 0.9
    assert groups["fast"].direction_accuracy >= 0.9
    assert groups["static"].net_motion < ev.FAST_THRESHOLD < groups["fast"].net_motion
    assert groups["all"].blobs_per_frame <= 1.5


def test_inference_cli_writes_enlarged_toy_videos(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("blue fast up\n")
    out = tmp_path / "videos"
    run = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--config_path", str(STUDENT), "--data_path",
                          str(prompts), "--output_folder", str(out), "video.num_output_frames=9"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    (video,) = out.glob("*.mp4")
    frames, fps = read_video(video)
    assert frames.shape == (9, 256, 256, 3) and fps == 8  # 8x8 latents, enlarged 32 times
    block = frames[0, :32, :32].reshape(-1, 3).astype(int)  # one latent pixel = one flat 32x32 square
    assert (block.max(0) - block.min(0)).max() <= 8  # (up to the codec's rounding)


@pytest.mark.slow
def test_toy_studies_smoke(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import toy_studies

    assert toy_studies.main(["all", "--smoke", "--out", str(tmp_path)]) == 0
    live = json.loads((tmp_path / "live.json").read_text())
    colour = live["results"]["cross"]["0"]["colour"]
    assert colour["clips"] == 2 and set(colour) >= {"latency_frames", "within_2_blocks", "jump_px"}
    assert "jump_px" not in live["results"]["reset"]["0"]["colour"]  # a reset starts a new video
    assert [g["gate"].split(":")[0] for g in live["gates"]][:2] == ["cross blend 0", "cross blend 0"]
    media = json.loads((tmp_path / "media.json").read_text())["results"]
    assert media["clips"] == 2 and {"start_error_px", "start_distance_px", "colour_accuracy",
                                    "direction_accuracy"} <= set(media["image_start"])
    assert {"seam_jump_px", "seam_speed_ratio", "speed_ratio", "colour_accuracy"} <= set(media["extension"])
    levers = json.loads((tmp_path / "levers.json").read_text())["results"]
    assert len(levers) == 5 and all(r["block_ms"] > 0 for r in levers.values())
    assert (tmp_path / "levers.md").read_text().count("\n|") >= 6


def test_switch_metrics_are_exact_on_constructed_clips():
    clip, _ = ev.WORLD.render(["red fast right"] * 2, 18, torch.Generator().manual_seed(0))
    switched = clip.clone()
    switched[:, 9:] = switched[:, 9:].roll(2, dims=2)  # the blob's channel: red -> blue from frame 9 on
    m = studies.switch_metrics(studies.SwitchClips(switched, ["blue fast right"] * 2, 9), "colour")
    assert m["latency_frames"]["median"] == 0 and m["within_2_blocks"] == 1.0
    assert m["jump_px"]["median"] < 1e-3 and m["colour_accuracy_after"] == 1.0  # continuous motion: no jump
    late = clip.clone()
    late[:, 13:] = late[:, 13:].roll(2, dims=2)  # the colour changes 4 frames after the switch
    assert studies.switch_metrics(studies.SwitchClips(late, ["blue fast right"] * 2, 9), "colour"
                                  )["latency_frames"]["median"] == 4
    moved = clip.clone()
    moved[:, 9:] = moved[:, 9:].roll(3, dims=-1)  # a 3-pixel jump at the switch
    assert abs(studies.switch_metrics(studies.SwitchClips(moved, ["red fast right"] * 2, 9), "colour"
                                      )["jump_px"]["median"] - 3) < 0.01
    wrong = studies.switch_metrics(studies.SwitchClips(clip, ["red fast up"] * 2, 9), "direction")
    assert wrong["latency_frames"]["never"] == 1.0 and wrong["within_2_blocks"] == 0.0
    right = studies.switch_metrics(studies.SwitchClips(clip, ["red fast right"] * 2, 9), "speed")
    assert right["latency_frames"]["median"] == 0


def test_switch_jump_is_zero_for_an_immediate_turn_or_stop_and_counts_a_teleport():
    start = torch.tensor([[1.0, 2.0]])
    right, up = torch.tensor([0.75, 0.0]), torch.tensor([0.0, -0.75])

    def clip(velocity_after, offset=0.0):  # 9 frames to the right, then velocity_after from the last position
        t = torch.arange(18, dtype=torch.float32)[:, None]
        centres = torch.where(t < 9, start + right * t, start + right * 8 + velocity_after * (t - 8) + offset)
        return -1.0 + 2.0 * torch.nn.functional.one_hot(torch.tensor(0), 3).float()[None, :, None, None] * \
            ev.WORLD.blob(centres)[:, None][None]

    turn = studies.switch_metrics(studies.SwitchClips(clip(up), ["red fast up"], 9), "direction")
    assert turn["jump_px"]["median"] < 0.05  # obeying at once is continuous
    assert abs(turn["jump_from_old_motion_px"]["median"] - 0.75 * 2 ** 0.5) < 0.05  # the old-motion-only measure
    stop = studies.switch_metrics(studies.SwitchClips(clip(torch.zeros(2)), ["red static right"], 9), "speed")
    assert stop["jump_px"]["median"] < 0.05
    teleport = studies.switch_metrics(studies.SwitchClips(clip(up, torch.tensor([-2.0, 0.0])), ["red fast up"], 9),
                                      "direction")
    assert abs(teleport["jump_px"]["median"] - 2.0) < 0.1  # 2 px beside where turning at once would be
