"""scripts/benchmark.py (the CLI of reward_forcing/benchmark/): a tiny-flavor CPU smoke of the CLI (seconds; a
subprocess because the stdout/stderr contract is the thing tested), the timed run is StreamingPipeline.stream
itself, and the models are build.py's. The benchmark itself is not a test: figures live in docs/benchmarks.md."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from reward_forcing.benchmark.flops import dit_flops_per_call
from reward_forcing.benchmark.timing import Clock, timed_stream
from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.models.wan import WanConfig

SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_script"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_smoke_prints_table_and_one_json_line(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--flavor", "tiny", "--num_frames", "6", "--repeats", "1", "--device", "cpu",
         "--text_encoder", "tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # stdout is the JSON record only; the table is on stderr
    rec = json.loads(lines[-1])
    assert rec == json.loads(out.read_text())
    positive = ["ttff_s", "ttff_cold_s", "ttff_with_text_s", "fps_dit", "fps_dit_vae", "fps_with_text",
                "fps_end_to_end", "end_to_end_s", "generation_s", "text_encode_ms", "prepare_context_ms",
                "denoise_ms", "denoise_step_ms", "context_ms", "dit_ms", "vae_ms", "block_ms", "first_block_ms",
                "peak_mem_gb", "peak_mem_total_gb", "peak_mem_text_gb", "kv_cache_gb", "dit_tflop_per_block",
                "dit_tflops_achieved"]
    for key in positive:
        assert isinstance(rec[key], (int, float)) and rec[key] > 0, (key, rec[key])
    assert rec["frames_per_block_out"] == [9, 12]  # first block 1 + 4 * 2 frames, then 4 * 3
    assert rec["steady_frames_per_block"] == 12 and rec["video_frames"] == 21
    assert rec["generator_calls_per_block"] == 5  # 4 denoising steps + the context pass
    assert rec["fps_dit"] > rec["fps_dit_vae"] > 0
    assert rec["fps_with_text"] <= rec["fps_dit_vae"]
    assert math.isclose(rec["dit_ms"], rec["denoise_ms"] + rec["context_ms"], rel_tol=0.05)
    for key, value in dict(schema="reward-forcing-benchmark/1", flavor="tiny", vae="tiny", device="cpu",
                           dtype="float32", height=48, width=80, latent_frames=6, frames_per_block=3,
                           local_attn_size=9, sink_size=3, sink_policy="ema", compile=False, repeats=1,
                           attention_backend="sdpa", peak_mem_kind="max_rss").items():
        assert rec[key] == value, key
    for key in ("device_name", "torch", "date"):
        assert rec[key]
    assert len(rec["runs"]) == 1
    # 3 cache buffers (keys, values, rotated keys) x 2 layers x 9 frames x 15 tokens x 64 channels, fp32
    assert rec["kv_cache_gb"] == pytest.approx(3 * 2 * 9 * 15 * 64 * 4 / 1e9)
    assert "time to first frame" in proc.stderr and "[9, 12]" in proc.stderr


def test_timed_loop_equals_pipeline_stream():
    pipe = build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml"))  # window 9, EMA sink 3, blocks of 3
    context = pipe.encode_prompts(["a fox in the snow"])
    kw = dict(num_frames=12, height=48, width=80, seed=7)
    with torch.no_grad():
        expected = list(pipe.stream(context=context, **kw))
    run = timed_stream(pipe, context, Clock(torch.device("cpu")), keep_outputs=True, **kw)
    assert pipe.phase_hook is None and not pipe.generator._forward_pre_hooks  # the timing hooks are removed again
    assert len(run.latents) == len(expected) == 4
    for chunk, latents, frames in zip(expected, run.latents, run.frames):
        assert torch.equal(chunk.latents, latents) and torch.equal(chunk.frames, frames)
    assert [b.frames for b in run.blocks] == [9, 12, 12, 12]
    assert all(b.calls == 5 and b.denoise_s > 0 and b.context_s > 0 and b.vae_s > 0 for b in run.blocks)
    assert 0 < run.ttff_s <= run.total_s


def test_cli_defaults_and_rejections(bench, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--help"])
    assert err.value.code == 0 and "--offload_text_encoder" in capsys.readouterr().out
    args = bench.parse_args(["--flavor", "1.3B"])
    assert (args.height, args.width, args.vae, args.num_frames, args.repeats) == (480, 832, "wan2.1", 21, 3)
    assert (args.spec.local_attn_size, args.spec.sink_size, args.spec.sink_policy) == (9, 3, "ema")
    # The models are build.py's: the flags become overrides of the config it builds from, with random weights.
    model, video = args.cfg.model, args.cfg.video
    assert (model.random_init, model.generator, model.vae, args.text_encoder) == (True, "1.3B", "wan2.1", "none")
    assert (video.height, video.width, video.num_output_frames) == (480, 832, 21)
    tiny = bench.parse_args([])
    assert (tiny.flavor, tiny.height, tiny.width, tiny.vae, tiny.text_encoder) == ("tiny", 48, 80, "tiny", "none")
    # A config is benchmarked as it would run: its models, cache, video size; flags and overrides win.
    cfg = bench.parse_args(["--config_path", str(REPO_ROOT / "configs" / "tiny.yaml"), "causal.sink_policy=static",
                            "--num_frames", "6"])
    assert (cfg.flavor, cfg.vae, cfg.text_encoder, cfg.height, cfg.width) == ("tiny", "tiny", "tiny", 48, 80)
    assert (cfg.num_frames, cfg.spec.sink_policy, cfg.spec.local_attn_size) == (6, "static", 9)
    assert (cfg.cfg.causal.sink_policy, cfg.cfg.video.num_output_frames) == ("static", 6)
    rope = bench.parse_args(["--rope_precision", "float32", "--compile", "--compile_mode", "max-autotune"])
    assert (rope.cfg.model.rope_precision, rope.cfg.model.compile, rope.cfg.model.compile_mode) == (
        "float32", True, "max-autotune")
    full = bench.parse_args(["--config_path", str(REPO_ROOT / "configs" / "reward_forcing.yaml")])
    assert (full.flavor, full.vae, full.text_encoder, full.height, full.num_frames) == ("1.3B", "wan2.1", "umt5-xxl",
                                                                                        480, 21)
    for bad in (["--num_frames", "7"], ["--num_frames", "3"], ["--height", "50"], ["--local_attn_size", "4"],
                ["--config_path", "/nonexistent.yaml"], ["model.no_such_key=1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_dit_flop_estimate_matches_the_documented_bound():
    """docs/benchmarks.md: ~121 TFLOP per 12-frame block of the 1.3B DiT at 832x480 with a full window."""
    cfg = WanConfig.from_flavor("1.3B")
    per_block = 5 * dit_flops_per_call(cfg, tokens_per_frame=30 * 52, query_frames=3, key_frames=9)
    assert 118e12 < per_block < 124e12
    assert 75 < 12 / (per_block / 800e12) < 82  # FPS bound at 800 TFLOP/s dense bf16
