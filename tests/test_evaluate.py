"""Evaluation kit: metrics on videos with known answers, the scoring CLI, comparisons, protocols, bad input.

Fixture videos are generated here (numpy arrays, or mp4s written with Mp4Writer); no binary fixtures.
"""
import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from reward_forcing.evaluation import metrics as M
from reward_forcing.evaluation.metrics import MetricConfig, score_frames
from reward_forcing.evaluation.protocol import ProtocolError, block_layout, generation_command, load_protocol
from reward_forcing.evaluation.report import load_run
from reward_forcing.evaluation.scorers import ScorerUnavailable, run_vbench, video_reward_scorer
from reward_forcing.evaluation.videos import describe_videos, read_video, VideoReadError
from reward_forcing.video_io import Mp4Writer, video_filename
from conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------------------------------
# Synthetic videos with known answers
# --------------------------------------------------------------------------------------------------
def texture(h, w, seed=0, sigma=1.5):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), sigma)


def panning(n=57, h=96, w=160, px=1, seed=0):
    """A smooth texture panning ``px`` pixels per frame: steady, seam-free motion."""
    canvas = texture(h, w + px * n, seed)
    return np.stack([canvas[:, px * t:px * t + w] for t in range(n)])


def moving_square(speed, n=41, h=160, w=400, size=80, seed=0):
    """A textured ``size``-pixel square moving ``speed`` px/frame to the right over a static texture."""
    background, square = texture(h, w, seed), texture(size, size, seed + 1)
    frames = np.repeat(background[None], n, axis=0)
    for t in range(n):
        x = int(round(8 + speed * t))
        frames[t, 40:40 + size, x:x + size] = square
    return frames


def write_mp4(path, frames, fps=16):
    with Mp4Writer(path, fps=fps) as writer:
        writer.write(frames)
    return path


# --------------------------------------------------------------------------------------------------
# Metrics with known answers (arrays: exact)
# --------------------------------------------------------------------------------------------------
def test_static_video_has_no_motion_no_flicker_and_copies_its_first_frame():
    scores = score_frames(np.repeat(texture(96, 160)[None], 41, axis=0), fps=16)
    v = scores.video
    assert v["frame_diff"] == 0 and v["flow_mean"] == 0 and v["flow_top5"] == 0 and v["dynamic"] == 0
    assert v["temporal_flickering"] == 1.0  # VBench's score: 1 - flicker, flicker = 0
    assert v["first_frame_copy"] == pytest.approx(1.0, abs=1e-12)
    assert v["seam_ratio"] == pytest.approx(1.0)
    assert v["hist_drift"] == 0
    assert v["luma_drift"] == pytest.approx(0, abs=1e-9) and v["sharpness_drift"] == pytest.approx(0, abs=1e-9)
    assert [(w["start_frame"], w["end_frame"]) for w in scores.windows] == [(0, 16), (16, 32), (32, 41)]


@pytest.mark.parametrize("speed", [1.5, 3.0])
def test_moving_square_flow_is_within_ten_percent_of_its_speed(speed):
    v = score_frames(moving_square(speed), fps=16).video
    # the fastest 5 % of pixels are the square's (it covers 10 % of the frame); flow in px per frame
    assert v["flow_top5"] == pytest.approx(speed, rel=0.10)
    assert v["frame_diff"] > 0 and v["temporal_flickering"] < 1


def test_flow_is_reported_in_original_pixels_when_downsampled():
    frames = np.stack([cv2.resize(f, (800, 320), interpolation=cv2.INTER_CUBIC) for f in moving_square(1.5)])
    v = score_frames(frames, fps=16, cfg=MetricConfig(flow_short_side=160)).video  # flow at half size
    assert v["flow_top5"] == pytest.approx(3.0, rel=0.10)


def test_injected_block_seams_raise_the_seam_ratio_only_at_block_boundaries():
    clean = panning()
    cfg = MetricConfig(first_block_frames=9, block_frames=12)

    def with_offsets(start):
        frames = clean.astype(np.int16)
        for t in range(len(frames)):
            block = 0 if t < start else 1 + (t - start) // 12
            frames[t] += 16 * (block % 2)  # a grey-level step at each seam; the pan moves ~5 levels/frame
        return np.clip(frames, 0, 255).astype(np.uint8)

    base = score_frames(clean, 16, cfg).video["seam_ratio"]
    seamed = score_frames(with_offsets(9), 16, cfg).video["seam_ratio"]  # jumps before frames 9, 21, 33, 45
    elsewhere = score_frames(with_offsets(14), 16, cfg).video["seam_ratio"]  # same jumps, 5 frames late
    assert base == pytest.approx(1.0, abs=0.1)
    assert seamed > 2 * base
    assert elsewhere < base


def test_slow_colour_drift_rises_monotonically():
    base = texture(96, 160).astype(np.float64)
    n = 81
    frames = []
    for t in range(n):
        f = base.copy()
        f[..., 0] *= 1 + 0.5 * t / n  # red up
        f[..., 2] *= 1 - 0.5 * t / n  # blue down
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    windows = score_frames(np.stack(frames), fps=16).windows
    assert len(windows) == 5
    drift = [w["hist_drift"] for w in windows]
    saturation = [w["saturation_drift"] for w in windows]
    assert drift[0] == 0 and all(b > a for a, b in zip(drift, drift[1:])), drift
    assert saturation[0] == 0 and all(b > a for a, b in zip(saturation, saturation[1:])), saturation


def test_first_frame_copy_tells_copying_from_new_content():
    moving = panning(n=45, px=6)
    copying = moving.copy()
    copying[9:] = moving[4]  # after the first block the video freezes on one of its first frames
    assert score_frames(copying, 16).video["first_frame_copy"] == pytest.approx(1.0)
    assert score_frames(moving, 16).video["first_frame_copy"] < 0.5


def test_vbench_dynamic_rule_numbers():
    assert M.vbench_frame_stride(16) == 2 and M.vbench_frame_stride(8) == 1 and M.vbench_frame_stride(4) == 1
    assert M.dynamic_rule(480, 832, 16, 41) == (pytest.approx(11.25), 10)  # 81 frames -> 41 sampled at 8 fps
    assert M.dynamic_rule(480, 832, 4, 20) == (pytest.approx(22.5), 5)  # slower than 8 fps: doubled
    assert M.dynamic_rule(256, 256, 8, 2)[1] == 1  # VBench's round(0.5) = 0 would need no moving pair
    assert M.block_boundaries(81, 9, 12).tolist() == [9, 21, 33, 45, 57, 69]
    assert M.time_windows(81, 16) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 81)]
    assert M.time_windows(10, 16) == [(0, 10)] and M.time_windows(40, 16)[-1] == (32, 40)
    assert block_layout(3) == (9, 12) and block_layout(1) == (1, 4)


def test_dynamic_verdict_follows_the_rule():
    fast = score_frames(moving_square(3.0, h=160, w=400), 16).video  # 6 px per sampled pair > 3.75 px
    slow = score_frames(moving_square(0.5, h=160, w=400), 16).video  # 1 px per pair
    assert fast["dynamic_threshold_px"] == pytest.approx(6.0 * 160 / 256)
    assert fast["dynamic"] == 1 and fast["dynamic_moving_pairs"] >= fast["dynamic_pairs_needed"]
    assert slow["dynamic"] == 0 and slow["dynamic_moving_pairs"] == 0


def test_bad_frames_and_settings_are_rejected():
    with pytest.raises(ValueError, match="at least 2 frames"):
        score_frames(np.zeros((1, 8, 8, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="uint8"):
        score_frames(np.zeros((4, 8, 8, 3), np.float32), 16)
    with pytest.raises(ValueError, match="window_frames"):
        score_frames(np.zeros((4, 8, 8, 3), np.uint8), 16, MetricConfig(window_frames=1))


# --------------------------------------------------------------------------------------------------
# Files, names and prompts
# --------------------------------------------------------------------------------------------------
def test_prompts_from_index_names_file_order_and_vbench_names(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n\na taxi\n")
    extended = tmp_path / "e.txt"
    extended.write_text("a red fox in deep snow\n\na yellow taxi at night\n")
    ours = [tmp_path / video_filename(2, "a taxi", 1)]
    [e] = describe_videos(ours, prompts, extended)
    assert (e.prompt, e.conditioning, e.prompt_index, e.sample, e.prompt_source) == (
        "a taxi", "a yellow taxi at night", 2, 1, "prompt file")
    [v] = describe_videos([tmp_path / "a cat playing piano-3.mp4"])
    assert (v.prompt, v.sample, v.prompt_source) == ("a cat playing piano", 3, "file name")
    ordered = describe_videos([tmp_path / "x.mp4", tmp_path / "y.mp4"], prompts)
    assert [o.prompt for o in ordered] == ["a fox", "a taxi"] and ordered[0].prompt_source == "file order"


def test_unreadable_videos_raise_one_line(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    for name, reason in (("empty.mp4", "empty (0 bytes)"), ("junk.mp4", "could not be decoded")):
        with pytest.raises(VideoReadError) as err:
            read_video(tmp_path / name)
        assert reason in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_cli"] = module
    spec.loader.exec_module(module)
    return module


def run(cli, *args):
    return cli.main([str(a) for a in args])


def test_a_folder_with_corrupt_and_empty_mp4s_is_scored_and_the_failures_listed(cli, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "0000-a-pan-s0.mp4", panning(n=33))
    write_mp4(videos / "0001-a-square-s0.mp4", moving_square(2.0, n=33, h=96, w=256, size=48))
    (videos / "0002-broken-s0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    (videos / "0003-empty-s0.mp4").write_bytes(b"")
    assert run(cli, videos, "--video_reward", "off", "--quiet") == 1
    err = capsys.readouterr().err.splitlines()
    assert sum("error: skipping 0002-broken-s0.mp4" in line for line in err) == 1
    assert sum("error: skipping 0003-empty-s0.mp4: " in line and "empty (0 bytes)" in line for line in err) == 1
    out = videos / "eval"
    records = [json.loads(line) for line in (out / "videos.jsonl").read_text().splitlines()]
    assert [r["video"] for r in records] == ["0000-a-pan-s0.mp4", "0001-a-square-s0.mp4"]
    assert records[0]["prompt"] == "a pan" and records[0]["num_frames"] == 33
    summary = json.loads((out / "summary.json").read_text())
    assert [name for name, _ in summary["failures"]] == ["0002-broken-s0.mp4", "0003-empty-s0.mp4"]
    assert summary["metrics"]["flow_mean"]["n"] == 2 and "dynamic_degree" in summary["metrics"]
    header = (out / "windows.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "video", "window"] and "hist_drift" in header
    assert len((out / "windows.jsonl").read_text().splitlines()) == 2 * 2  # 33 frames: 2 windows each
    assert (out / "strips" / "0000-a-pan-s0.png").is_file() and "Failed videos" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, named", [
    (["{tmp}/nowhere"], "video folder '{tmp}/nowhere' does not exist"),
    (["{tmp}/empty_dir"], "no .mp4 files in"),
    (["{tmp}/empty_dir", "--compare", "{tmp}"], "give exactly one of"),
    (["--protocol", "{tmp}/nope.yaml", "--output_dir", "{tmp}/out"], "protocol file '{tmp}/nope.yaml' does not exist"),
    (["--compare", "{tmp}/a", "{tmp}/b", "--labels", "x"], "--labels has 1 names for 2 --compare folders"),
    (["{tmp}/empty_dir", "--window_frames", "1"], "window_frames must be >= 2"),
    (["--protocol", str(REPO_ROOT / "configs/eval/vbench_5s.yaml"), "--output_dir", "{tmp}/out", "--set",
      "prompts.file={tmp}/missing.txt"], "python scripts/fetch_prompts.py"),
    (["--protocol", str(REPO_ROOT / "configs/eval/long_30s.yaml")], "--protocol needs --output_dir"),
])
def test_bad_input_is_one_line_and_creates_nothing(cli, tmp_path, capsys, args, named):
    (tmp_path / "empty_dir").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert run(cli, *[a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named.format(tmp=tmp_path) in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_required_video_reward_names_what_to_download(cli, tmp_path, capsys):
    videos = tmp_path / "v"
    videos.mkdir()
    write_mp4(videos / "clip-0.mp4", panning(n=17))
    assert run(cli, videos, "--video_reward", "on", "--checkpoint_root", tmp_path / "ckpt") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KlingTeam/VideoReward" in err and "VideoReward" in err
    assert not (videos / "eval").exists()
    # auto: the same absence is a note and the weight-free metrics still run
    assert run(cli, videos, "--checkpoint_root", tmp_path / "ckpt", "--quiet", "--no_report") == 0
    summary = json.loads((videos / "eval" / "summary.json").read_text())
    assert summary["num_scored"] == 1 and "KlingTeam/VideoReward" in summary["notes"][0]
    assert "VQ" not in summary["metrics"]


def test_video_reward_adapter_with_the_tiny_model():
    score = video_reward_scorer(TINY, batch_size=1)
    videos = [panning(n=17, h=56, w=56), moving_square(2, n=17, h=56, w=96, size=16)]
    one_by_one = score(videos, ["a pan", "a square"], [16.0, 16.0])
    together = video_reward_scorer(TINY, batch_size=2)(videos, ["a pan", "a square"])  # fps None: 16
    mixed_rates = score(videos, ["a pan", "a square"], [16.0, 24.0])  # scored per frame rate, order kept
    assert set(one_by_one[0]) == {"VQ", "MQ", "TA"}
    for a, b in zip(one_by_one, together):
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert one_by_one[0] != one_by_one[1]  # different videos, different scores
    assert mixed_rates[0] == pytest.approx(one_by_one[0], abs=1e-4)


def test_vbench_is_optional():
    if importlib.util.find_spec("vbench") is not None:
        pytest.skip("the optional vbench package is installed; this test covers its absence")
    with pytest.raises(ScorerUnavailable, match=r"pip install -e \"\.\[vbench\]\""):
        run_vbench([], ["dynamic_degree"], "unused")


# --------------------------------------------------------------------------------------------------
# Protocol end to end on the tiny model, then a comparison
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def protocol_run(cli, tmp_path_factory):
    """configs/tiny.yaml through the protocol command: inference.py generates 2 prompts x 21 frames, then the
    videos are scored with the tiny VideoReward."""
    tmp = tmp_path_factory.mktemp("protocol")
    (tmp / "short.txt").write_text("a fox in the snow\na taxi at night\nnot used\n")
    (tmp / "long.txt").write_text("a red fox trotting through snow\na yellow taxi on a wet avenue\nx\n")
    protocol = tmp / "tiny_protocol.yaml"
    protocol.write_text(
        "name: tiny\n"
        f"prompts: {{file: {tmp / 'short.txt'}, extended: {tmp / 'long.txt'}, limit: 2}}\n"
        f"generation: {{config: {TINY}, num_output_frames: 6, height: 48, width: 80, num_samples: 1, seed: 3}}\n"
        "scoring: {window_frames: 8, video_reward: auto, reward_batch_size: 2}\n")
    out = tmp / "out"
    rc = run(cli, "--protocol", protocol, "--output_dir", out, "--quiet")
    return rc, out


def test_protocol_generates_with_inference_and_scores(protocol_run):
    rc, out = protocol_run
    assert rc == 0
    names = sorted(p.name for p in (out / "videos").glob("*.mp4"))
    assert names == ["0000-a-fox-in-the-snow-s0.mp4", "0001-a-taxi-at-night-s0.mp4"]
    run = load_run(out / "eval")
    assert run.label == "tiny" and len(run.videos) == 2
    first = run.videos[0]
    assert first["num_frames"] == 21 and first["prompt"] == "a fox in the snow"  # 6 latent frames -> 21
    assert all(np.isfinite(first[k]) for k in ("VQ", "MQ", "TA", "seam_ratio", "flow_mean", "hist_drift"))
    assert json.loads((out / "eval" / "summary.json").read_text())["settings"]["metrics"]["block_frames"] == 12
    assert len(run.windows) == 2 * 3  # 21 frames in windows of 8: 8, 13
    cmd = json.loads((out / "generate_command.json").read_text())
    assert "--extended_prompt_path" in cmd and "video.height=48" in cmd and cmd[cmd.index("--seed") + 1] == "3"
    assert (out / "prompts" / "short.txt").read_text().count("\n") == 2  # prompts.limit = 2


def test_report_html_is_self_contained(protocol_run):
    _, out = protocol_run
    html = (out / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 + 2  # two plots, one strip per video
    assert 'src="http' not in html and "<link" not in html and "0001-a-taxi-at-night-s0.mp4" in html


def test_compare_puts_runs_side_by_side(cli, protocol_run, tmp_path, capsys):
    _, out = protocol_run
    other = tmp_path / "static_sink"
    other.mkdir()
    for name in ("0000-a-fox-in-the-snow-s0.mp4", "0001-a-taxi-at-night-s0.mp4"):
        write_mp4(other / name, np.repeat(texture(48, 80)[None], 21, axis=0))
    report = tmp_path / "cmp"
    assert run(cli, "--compare", out / "eval", other, "--labels", "ema", "static", "--output_dir", report,
               "--video_reward", "off", "--quiet") == 0
    table = (report / "compare.md").read_text()
    assert table.splitlines()[0] == "| metric | ema | static |" and "| first_frame_copy | " in table
    rows = (report / "compare_videos.csv").read_text().splitlines()
    assert len(rows) == 3 and "first_frame_copy@ema" in rows[0] and "first_frame_copy@static" in rows[0]
    static = load_run(other / "eval")
    assert static.summary["metrics"]["first_frame_copy"]["mean"] == pytest.approx(1.0)
    for png in ("metrics_over_time.png", "histograms.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report / "report.html").read_text()
    assert html.count('class="strip"') == 4 and "static" in html
    assert "ema" in capsys.readouterr().out


def test_protocol_values_are_checked(tmp_path):
    with pytest.raises(ProtocolError, match="generation.num_samples: must be >= 1"):
        load_protocol(REPO_ROOT / "configs" / "eval" / "vbench_5s.yaml", ["generation.num_samples=0"])
    with pytest.raises(ProtocolError, match="bad protocol key 'scoring.no_such_key'"):
        load_protocol(REPO_ROOT / "configs" / "eval" / "vbench_5s.yaml", ["scoring.no_such_key=1"])


def test_shipped_protocols_and_multi_gpu_command():
    short = load_protocol(REPO_ROOT / "configs" / "eval" / "vbench_5s.yaml")
    long = load_protocol(REPO_ROOT / "configs" / "eval" / "long_30s.yaml")
    assert (short.generation.num_output_frames, short.generation.num_samples) == (21, 5)
    assert short.prompts.file == "prompts/vbench/all_dimension.txt" and len(short.scoring.vbench_dimensions) == 16
    assert (long.generation.num_output_frames, long.generation.height, long.generation.width) == (120, 480, 832)
    cmd = generation_command(short, inference_script="inference.py", prompt_file="p.txt", extended_file=None,
                             output_folder="o", checkpoint_path="rf.pt", nproc_per_node=8, python="python")
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert cmd[cmd.index("--num_samples") + 1] == "5" and cmd[cmd.index("--checkpoint_path") + 1] == "rf.pt"


def test_evaluation_never_imports_training():
    # (the model-based scorers import reward_forcing.build lazily; build.py keeps training out on its own)
    code = ("import sys; import reward_forcing.evaluation.runner, reward_forcing.evaluation.protocol, "
            "reward_forcing.evaluation.report, reward_forcing.evaluation.benchmark; "
            "bad = [m for m in sys.modules if m.startswith('reward_forcing.training')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_benchmark_runs_on_a_small_video():
    from reward_forcing.evaluation.benchmark import run_benchmark

    result = run_benchmark(num_frames=17, height=64, width=96, repeats=1, threads=None)
    assert result["frames"] == 17 and all(result[k] > 0 for k in ("decode_s", "flow_s", "metrics_s"))
