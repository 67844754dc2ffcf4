"""Parallelism, sharded EMA and checkpointing: single-process paths (no process group) and one 2-process gloo run
of FSDP2 + DCP."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import free_port
from reward_forcing.training import checkpointing
from reward_forcing.training.checkpointing import (
    full_state_dict,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    remove_leftovers,
    save_training_state,
)
from reward_forcing.training.ema import ShardedEMA
from reward_forcing.training.parallel import (
    all_reduce_sum,
    barrier,
    broadcast_int,
    broadcast_object,
    cleanup,
    init_distributed,
    seed_everything,
    shard_model,
)


class Toy(nn.Module):
    """A 'transformer' with ``blocks`` (uneven row counts, so 2-rank shards are uneven) and a buffer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(5, 5) for _ in range(2)])
        self.head = nn.Linear(5, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x) * self.scale


def _train_step(model, opt, x, y, max_norm=0.05):
    """One step as the trainer takes it: torch's clip_grad_norm_ (FSDP2 DTensor gradients: the norm over all
    ranks' shards, returned as a DTensor)."""
    from torch.distributed.tensor import DTensor

    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()


# ============================================================================ single process, no group
def test_single_process_init_and_helpers(no_torchrun_env):
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not info.distributed and not dist.is_initialized()
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert broadcast_int(7) == 7
    values = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_sum(values), values.double())
    barrier()
    cleanup()


def test_seed_everything_deterministic():
    assert seed_everything(0, rank=3) == 3
    a = torch.rand(3)
    seed_everything(0, rank=3)
    torch.testing.assert_close(torch.rand(3), a)
    assert seed_everything(5, rank=0) == 5
    assert isinstance(seed_everything(None, rank=0), int)
    with pytest.raises(ValueError):
        seed_everything(-1)


def test_shard_model_single_process_returns_module_unchanged(no_torchrun_env):
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert shard_model(model, mixed_precision=True) is model
    assert all(p.dtype == torch.float32 and type(p) is nn.Parameter for p in model.parameters())
    sd = full_state_dict(model)
    assert list(sd) == list(before)
    for k in before:
        torch.testing.assert_close(sd[k], before[k])
        assert sd[k].data_ptr() != model.state_dict()[k].data_ptr()  # a copy, not the live weights


def test_ema_math_decay_099():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = ShardedEMA(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
    ema.update(model, 0.99)
    # 0.99 * [1, 2] + 0.01 * [3, 0] = [1.02, 1.98]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([[1.02, 1.98]]))
    ema.update(model, 0.99)
    # 0.99 * [1.02, 1.98] + 0.01 * [3, 0] = [1.0398, 1.9602]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([[1.0398, 1.9602]]))
    assert ema.num_updates == 2
    full = ema.full_state_dict(model)
    assert list(full) == ["weight"] and full["weight"].dtype == torch.float32
    torch.testing.assert_close(full["weight"], torch.tensor([[1.0398, 1.9602]]))
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(2, 2), 0.99)


def test_ema_bf16_module_keeps_fp32_shadow():
    model = nn.Linear(4, 4).bfloat16()
    ema = ShardedEMA(model)
    assert ema.shadow[0].dtype == torch.float32
    ema.update(model, 0.5)
    full = ema.full_state_dict(model)
    assert set(full) == {"weight", "bias"} and full["weight"].dtype == torch.float32


def test_save_load_round_trip_single_process(tmp_path, no_torchrun_env):
    torch.manual_seed(0)
    model, x, y = Toy(), torch.randn(4, 5), torch.randn(4, 3)
    opt = _adamw(model)
    ema = ShardedEMA(model)
    for _ in range(2):
        _train_step(model, opt, x, y)
        ema.update(model, 0.9)
    torch.manual_seed(42)
    ckpt = save_training_state(tmp_path / "ckpt", models={"gen": model}, optimizers={"gen": opt},
                               extra={"step": 2, "sampler": {"epoch": 1, "index": 5}}, stateful={"ema": ema})
    assert ckpt == (tmp_path / "ckpt").absolute()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no leftovers
    expected_rand = torch.rand(2)

    torch.manual_seed(7)
    model2 = Toy()
    opt2 = _adamw(model2)
    ema2 = ShardedEMA(model2)
    extra = load_training_state(ckpt, {"gen": model2}, {"gen": opt2}, stateful={"ema": ema2})
    assert extra == {"step": 2, "sampler": {"epoch": 1, "index": 5}}
    torch.testing.assert_close(torch.rand(2), expected_rand)  # RNG restored
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for a, b in zip(ema.shadow, ema2.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ema2.num_updates == 2
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s1[i][key], s2[i][key], rtol=0, atol=0)
    # Identical next step proves the optimizer state is in use.
    _train_step(model, opt, x, y)
    _train_step(model2, opt2, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Overwriting an existing checkpoint works and keeps a single folder.
    save_training_state(ckpt, models={"gen": model}, extra={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_training_state(ckpt, {"gen": model2}, restore_rng=False) == {"step": 3}


def test_load_errors(tmp_path, no_torchrun_env):
    model = Toy()
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_training_state(tmp_path, {"gen": model})
    save_training_state(tmp_path / "c", models={"gen": model})
    with pytest.raises(KeyError, match="critic"):
        load_training_state(tmp_path / "c", {"critic": model})
    with pytest.raises(ValueError, match="no model of the same name"):
        save_training_state(tmp_path / "d", models={"gen": model}, optimizers={"critic": _adamw(model)})


def test_atomic_save_failure_leaves_nothing(tmp_path, monkeypatch, no_torchrun_env):
    model = Toy()
    save_training_state(tmp_path / "ckpt", models={"gen": model}, extra={"step": 1})
    real_save = checkpointing.dcp.save

    def half_save(state, *, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # files written ...
        raise OSError("disk full")  # ... then the job dies

    monkeypatch.setattr(checkpointing.dcp, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path / "ckpt", models={"gen": model}, extra={"step": 2})
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path / "new", models={"gen": model}, extra={"step": 2})
    # The previous checkpoint is intact, the new one does not exist, no temporary folders remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_training_state(tmp_path / "ckpt", {"gen": model}) == {"step": 1}

    # A failure while writing extra (unpicklable value) also leaves nothing behind.
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    with pytest.raises(Exception):
        save_training_state(tmp_path / "new", models={"gen": model}, extra={"bad": lambda: 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_killed_save_is_never_a_candidate_and_is_cleaned(tmp_path, monkeypatch, no_torchrun_env):
    model = Toy()
    save_training_state(tmp_path / "step_000002", models={"gen": model}, extra={"step": 2})
    real_save = checkpointing.dcp.save

    def killed(state, *, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        raise KeyboardInterrupt  # like a signal mid-save: no error handling runs, the folder stays

    monkeypatch.setattr(checkpointing.dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(tmp_path / "step_000004", models={"gen": model}, extra={"step": 4})
    leftovers = [p for p in tmp_path.iterdir() if p.name != "step_000002"]
    assert len(leftovers) == 1 and (leftovers[0] / ".metadata").is_file()  # DCP's part was complete
    assert list_checkpoints(tmp_path) == [tmp_path / "step_000002"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert load_training_state(latest_checkpoint(tmp_path), {"gen": model}) == {"step": 2}
    assert remove_leftovers(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


def test_keep_last_checkpoints_by_step_number(tmp_path, no_torchrun_env):
    model = Toy()
    for step in (9, 10, 100):  # numeric order differs from name order ("step_10" < "step_9")
        save_training_state(tmp_path / f"step_{step}", models={"gen": model}, extra={"step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_9", "step_10", "step_100"]
    assert prune_checkpoints(tmp_path, None) == []
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "step_9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_100"]
    assert prune_checkpoints(tmp_path, 2) == []


# ============================================================================ two processes, gloo
def _worker(rank: int, world: int, port: int, ckpt_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo")
    try:
        _two_rank_checks(info, rank, world, ckpt_dir)
    finally:
        cleanup()  # after the checks returned, so their sharded models are released (see cleanup)


def _two_rank_checks(info, rank: int, world: int, ckpt_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    assert info.world_size == world and info.rank == rank and dist.get_backend() == "gloo"
    assert broadcast_int(11 if rank == 0 else -1) == 11
    assert broadcast_object("r0" if rank == 0 else None) == "r0"

    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)  # the single-process computation, on every rank
    torch.manual_seed(1)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    half = slice(2 * rank, 2 * rank + 2)  # each rank its half of the batch

    shard_model(model, mixed_precision=False)
    w = model.blocks[0].weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == (3, 2)[rank]  # uneven shards

    opt, ref_opt = _adamw(model), _adamw(ref)
    ema = ShardedEMA(model)
    ref_ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for _ in range(2):
        norm = _train_step(model, opt, x[half], y[half])
        ref_norm = _train_step(ref, ref_opt, x, y)  # FSDP averages the two half-batch gradients
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        ema.update(model, 0.9)
        for n, p in ref.named_parameters():
            ref_ema[n] = 0.9 * ref_ema[n] + 0.1 * p.detach()

    full = full_state_dict(model)
    ema_full = ema.full_state_dict(model)
    if rank == 0:
        assert list(full) == list(ref.state_dict())  # clean keys: blocks.0.weight, ..., scale
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full[k], v, atol=1e-6, rtol=1e-5)
            assert not isinstance(full[k], DTensor) and full[k].device.type == "cpu"
        assert set(ema_full) == set(ref_ema) | {"scale"}
        for k, v in ref_ema.items():
            torch.testing.assert_close(ema_full[k], v, atol=1e-6, rtol=1e-5)
    else:
        assert full == {} and ema_full == {}

    save_training_state(ckpt_dir, models={"gen": model}, optimizers={"gen": opt},
                        extra={"step": 2}, stateful={"ema": ema})
    assert sorted(os.listdir(Path(ckpt_dir).parent)) == [Path(ckpt_dir).name]

    torch.manual_seed(100 + rank)  # a deliberately different fresh model
    model2 = shard_model(Toy(), mixed_precision=False)
    opt2 = _adamw(model2)
    ema2 = ShardedEMA(model2)
    extra = load_training_state(ckpt_dir, {"gen": model2}, {"gen": opt2}, stateful={"ema": ema2})
    assert extra == {"step": 2} and ema2.num_updates == 2
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.to_local(), b.to_local())
    for a, b in zip(ema.shadow, ema2.shadow):
        assert torch.equal(a, b)
    # Same next step on original and reloaded => optimizer state restored; still equals the reference.
    _train_step(model, opt, x[half], y[half])
    _train_step(model2, opt2, x[half], y[half])
    _train_step(ref, ref_opt, x, y)
    full2 = {k: v.full_tensor() for k, v in model2.state_dict().items() if isinstance(v, DTensor)}
    gathered = [None] * world
    dist.all_gather_object(gathered, full2)
    for k, v in full2.items():
        torch.testing.assert_close(gathered[0][k], gathered[1][k], rtol=0, atol=0)  # ranks agree
        torch.testing.assert_close(v, ref.state_dict()[k], atol=1e-6, rtol=1e-5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a.to_local(), b.to_local())

    # Mixed precision: bf16 compute (gloo all-gathers bf16), fp32 master shards and gradients.
    mp_model = shard_model(Toy(), mixed_precision=True)
    out = mp_model(x[half].bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    p = mp_model.head.weight
    assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and isinstance(p.grad, DTensor)
    frozen = shard_model(Toy().requires_grad_(False), mixed_precision=True)
    assert not any(q.requires_grad for q in frozen.parameters())
    with torch.no_grad():
        assert frozen(x[half].bfloat16()).dtype == torch.bfloat16
    # Logged means: every rank's sums add up.
    total = all_reduce_sum(torch.tensor([float(rank + 1), 1.0]))
    assert total.tolist() == [3.0, 2.0]


def test_two_process_gloo_fsdp2_dcp(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    ckpt = tmp_path / "ckpts" / "step_2"
    mp.spawn(_worker, args=(2, free_port(), str(ckpt)), nprocs=2, join=True)
    assert (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    # The 2-rank checkpoint loads into a single unsharded process (DCP reshards).
    torch.manual_seed(0)
    model = Toy()
    opt = _adamw(model)
    ema = ShardedEMA(model)
    extra = load_training_state(ckpt, {"gen": model}, {"gen": opt}, stateful={"ema": ema}, restore_rng=False)
    assert extra == {"step": 2} and ema.num_updates == 2
