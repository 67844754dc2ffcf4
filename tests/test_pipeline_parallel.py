"""Pipeline-parallel streaming (reward_forcing/pipeline_parallel.py): the layer split, a model holding a slice of
its layers, and two gloo ranks streaming the same latents as one process (tiny random model and the toy student)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import REPO_ROOT, free_port
from reward_forcing.build import build_pipeline
from reward_forcing.config import ConfigError, load_config
from reward_forcing.models.wan import WanModel, init_random_
from reward_forcing.pipeline_parallel import WanPipelineStage, micro_batch_rows, stage_layers

TINY = "configs/tiny.yaml"
TOY = "configs/toy/student.yaml"


def test_stage_layers_cover_the_model_in_order():
    assert [list(stage_layers(30, 4, s)) for s in range(4)] == [
        list(range(0, 8)), list(range(8, 16)), list(range(16, 23)), list(range(23, 30))]
    assert stage_layers(6, 1, 0) == range(6)
    for layers, stages in [(2, 2), (7, 3), (40, 8)]:
        covered = [i for s in range(stages) for i in stage_layers(layers, stages, s)]
        assert covered == list(range(layers))
    with pytest.raises(ValueError, match="3 pipeline stages for a model of 2 layers"):
        stage_layers(2, 3, 0)
    with pytest.raises(ValueError, match="stage 2 is not one of the 2 stages"):
        stage_layers(4, 2, 2)


def test_micro_batch_rows():
    assert micro_batch_rows(5, 2) == [slice(0, 2), slice(2, 5)]
    assert micro_batch_rows(1, 4) == [slice(0, 1)]  # one stream cannot be split
    assert micro_batch_rows(4, 4) == [slice(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        micro_batch_rows(2, 0)


def test_config_rejects_zero_micro_batches():
    with pytest.raises(ConfigError, match="model.pipeline_micro_batches"):
        load_config(TINY, ["model.pipeline_micro_batches=0"])


def test_a_stage_holds_only_its_layers_and_their_caches():
    full = init_random_(WanModel.from_flavor("tiny"))
    n = full.config.num_layers
    stage = WanPipelineStage.from_model(full, stage=1, stages=2)
    held = stage_layers(n, 2, 1)
    assert stage.held_layers == held
    layer_keys = {k.split(".")[1] for k in stage.state_dict() if k.startswith("blocks.")}
    assert layer_keys == {str(i) for i in held}
    for key, value in stage.state_dict().items():  # same tensors, same names as the full model's
        assert torch.equal(value, full.state_dict()[key]), key
    assert stage.new_kv_cache(2, 4, 4, max_frames=6).num_layers == len(held)
    context = stage.prepare_context(torch.randn(2, 3, full.config.text_dim))
    assert len(context.layer_kv) == len(held)
    with pytest.raises(ValueError, match=r"layers \[2, 2\) are not a non-empty range"):
        WanModel.from_flavor("tiny").hold_layers(2, 2)
    # A cache of the full model does not fit a stage: said in one line, before any layer runs.
    cache = full.new_kv_cache(2, 4, 4, max_frames=6)
    x, t = torch.randn(2, 3, full.config.in_dim, 4, 4), torch.full((2, 3), 500.0)
    with torch.no_grad(), pytest.raises(ValueError, match=f"KV cache holds {n} layers; this model runs {len(held)}"):
        stage(x, t, torch.randn(2, 3, full.config.text_dim), kv_cache=cache)


def test_one_stage_is_the_model():
    full = init_random_(WanModel.from_flavor("tiny"))
    stage = WanPipelineStage.from_model(full, stage=0, stages=1)
    x, t, c = torch.randn(1, 3, full.config.in_dim, 4, 4), torch.full((1, 3), 700.0), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(stage(x, t, c), full(x, t, c))


# ============================================================================ two processes, gloo
CASES = [  # (config, prompts, latent frames, micro-batches)
    (TINY, ["a cat", "a dog"], 9, 2),
    (TOY, ["red fast right", "blue any up"], 6, 1),
]


def _generate(config: str, prompts: list[str], frames: int, micro_batches: int) -> tuple[torch.Tensor, object]:
    overrides = [f"model.pipeline_micro_batches={micro_batches}", "model.pipeline_parallel=true"]
    pipe = build_pipeline(load_config(config, overrides))
    _, latents = pipe.generate(prompts, num_frames=frames, seed=3, decode=False)
    return latents, pipe.generator


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = []
        for config, prompts, frames, micro in CASES:
            latents, stage = _generate(config, prompts, frames, micro)
            assert isinstance(stage, WanPipelineStage) and stage.stage == rank
            results.append({"latents": latents, "held": list(stage.held_layers), "stats": vars(stage.stats).copy(),
                            "parameters": sum(p.numel() for p in stage.parameters())})
        torch.save(results, f"{out}/rank{rank}.pt")
        benchmark = _benchmark_module()  # its record, from both ranks (it ends the process group)
        record = benchmark.run(benchmark.parse_args(["--blocks", "2", "--warmup_blocks", "1", "--repeats", "1",
                                                     "--batch", "2", "--micro_batches", "2"]))
        Path(f"{out}/benchmark{rank}.json").write_text(json.dumps(record))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_benchmark", REPO_ROOT / "scripts/pipeline_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_gloo_ranks_stream_the_latents_of_one_process(tmp_path, monkeypatch):
    mp = pytest.importorskip("torch.multiprocessing")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for case, (config, prompts, frames, micro) in enumerate(CASES):
        alone, full = _generate(config, prompts, frames, micro)  # no process group: the whole model, one process
        assert not isinstance(full, WanPipelineStage)
        first, last = ranks[0][case], ranks[1][case]
        n = full.config.num_layers
        assert first["held"] + last["held"] == list(range(n))
        assert first["parameters"] + last["parameters"] - sum(p.numel() for p in full.parameters()) == sum(
            p.numel() for name, p in full.named_parameters() if not name.startswith("blocks."))  # shared parts
        # Same latents on both ranks (the last stage broadcasts) and as one process, within fp32 noise.
        assert torch.equal(first["latents"], last["latents"])
        scale = alone.abs().max().item()
        assert (first["latents"] - alone).abs().max().item() <= 1e-5 * scale, config
        # Bytes: stage 0 sends the hidden states of every forward, stage 1 broadcasts the flow.
        forwards = (frames // 3) * 5  # 4 denoising steps and the context pass per block
        assert first["stats"]["forwards"] == last["stats"]["forwards"] == forwards
        tokens = 3 * full.tokens_per_frame(*alone.shape[-2:])  # one block's tokens
        assert first["stats"]["bytes_sent"] == forwards * len(prompts) * tokens * full.config.dim * 4
        assert last["stats"]["bytes_sent"] == forwards * len(prompts) * 3 * alone[0, 0].numel() * 4
        assert first["stats"]["busy_s"] > 0 and last["stats"]["busy_s"] > 0

    # The benchmark's record (rank 0 only): both stages' busy time, bubble and bytes per block.
    assert json.loads((tmp_path / "benchmark1.json").read_text()) is None
    record = json.loads((tmp_path / "benchmark0.json").read_text())
    assert record["stages"] == 2 and record["batch"] == 2 and record["micro_batches"] == 2
    first, last = record["ranks"]
    assert first["layers"] == [0, 1] and last["layers"] == [1, 2]
    assert first["forwards_per_block"] == last["forwards_per_block"] == 5
    # tiny at 80x48: 6x10 latents, 2x2 patches: 15 tokens per frame, 45 per block; dim 64; fp32
    assert first["sent_mb"] * 2**20 == pytest.approx(5 * 2 * 45 * 64 * 4)  # 5 forwards x 2 streams
    assert last["sent_mb"] * 2**20 == pytest.approx(5 * 2 * 3 * 16 * 6 * 10 * 4)  # the flow, broadcast
    for r in (first, last):
        assert 0 < r["busy_ms"] < r["block_ms_mean"] and 0 < r["bubble"] < 1


def test_benchmark_baseline_is_one_process(capsys):
    benchmark = _benchmark_module()
    assert benchmark.main(["--blocks", "2", "--warmup_blocks", "1", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[-1])
    assert record["stages"] == 1 and record["ranks"][0]["layers"] == [0, 2] and "busy_ms" not in record["ranks"][0]
    assert record["fps_per_stream"] == pytest.approx(12 / (record["block_ms"] / 1e3))
    assert "| 0 | 0-1 |" in err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--warmup_blocks", "3", "--blocks", "3"])
    assert "--warmup_blocks 3 must be in [0, --blocks 3)" in capsys.readouterr().err
