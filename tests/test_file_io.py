"""Reading weight files, key normalisation, strict loading and atomic writes (reward_forcing.file_io)."""
import argparse
import os
import stat

import pytest
import torch
from torch import nn

from reward_forcing import file_io
from reward_forcing.file_io import CorruptFileError


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.randn(64, generator=g)}


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ torch.load
def test_load_torch_file_reads_zip_and_legacy_formats(tmp_path):
    sd = _state()
    torch.save(sd, tmp_path / "new.pt")
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    for name in ("new.pt", "old.pt"):
        loaded = file_io.load_torch_file(tmp_path / name)
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),           # an interrupted download
    (lambda b: b"\x80\x02" + os.urandom(200), "truncated or corrupt"),  # garbage after a pickle header
    (lambda b: b"PK\x03\x04" + b"\0" * 100, "truncated or corrupt"),  # a zip that never got its index
    (lambda b: b"", "is empty"),
    (lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "Git LFS pointer"),
    (lambda b: b"<!DOCTYPE html><html>404</html>", "web page"),
])
def test_corrupt_pt_names_the_file_and_the_fix(tmp_path, damage, reason):
    torch.save(_state(), tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(damage((tmp_path / "good.pt").read_bytes()))
    with pytest.raises(CorruptFileError) as err:
        file_io.load_torch_file(bad)
    msg = _one_line_naming(err, bad)
    assert reason in msg and "re-download" in msg
    assert "Python objects" not in msg  # a corrupt file is not a file with objects in it


def test_pickled_objects_are_refused_by_name(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"generator": _state(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CorruptFileError) as err:
        file_io.load_torch_file(path)
    msg = _one_line_naming(err, path)
    assert "Python objects other than tensors (argparse.Namespace)" in msg and "torch.save(" in msg


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        file_io.load_torch_file(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        file_io.load_safetensors_file(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
    from safetensors.torch import save_file

    good, bad = tmp_path / "good.safetensors", tmp_path / "x.safetensors"
    save_file(_state(), str(good))
    data = good.read_bytes()
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CorruptFileError) as err:
        file_io.load_safetensors_file(bad)
    msg = _one_line_naming(err, bad)
    assert msg.startswith(f"{bad} is not a valid safetensors file (truncated or corrupt: ")
    assert msg.endswith("re-download it (or save it again, if you wrote it)")
    loaded = file_io.load_safetensors_file(good)
    assert all(torch.equal(loaded[k], v) for k, v in _state().items())


def test_garbage_safetensors_names_the_file(tmp_path):
    bad = tmp_path / "g.safetensors"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(CorruptFileError) as err:
        file_io.load_safetensors_file(bad)
    assert "not a valid safetensors file" in _one_line_naming(err, bad)


# ------------------------------------------------------------------------------------------------ key names
def test_normalize_key_drops_wrapper_segments():
    nk = file_io.normalize_key
    assert nk("_fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert nk("_orig_mod.head.bias") == "head.bias"
    assert nk("module._orig_mod.head.bias") == "head.bias"  # DDP around a compiled model
    assert nk("blocks.0.module.weight") == "blocks.0.module.weight"  # a submodule named "module" is kept
    assert nk("model.head.bias") == "model.head.bias"  # a layout prefix is the caller's to strip ...
    assert nk("model._fsdp_wrapped_module.blocks.0.w", strip_prefix="model.") == "blocks.0.w"  # ... like this
    assert nk("_orig_mod.model.head.head.weight", strip_prefix="model.") == "head.head.weight"
    assert nk("module.model.patch_embedding.bias", strip_prefix="model.") == "patch_embedding.bias"


def test_normalize_key_matches_real_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2)), nn.Linear(2, 2))
    assert [file_io.normalize_key(k) for k in wrapped.state_dict()] == list(plain.state_dict())
    ddp_like = nn.Module()
    ddp_like.module = plain  # how DataParallel / DDP name the model they wrap
    assert [file_io.normalize_key(k) for k in ddp_like.state_dict()] == list(plain.state_dict())


# ------------------------------------------------------------------------------------------------ strict loading
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def test_load_weights_optional_keys_and_explain():
    sd = {k: torch.randn_like(v) for k, v in _Net().state_dict().items()}
    partial = {k: v for k, v in sd.items() if not k.startswith("head.")}
    net = _Net()
    file_io.load_weights(net, partial, optional={"head.weight", "head.bias"})
    assert torch.equal(net.body.weight, sd["body.weight"])
    with pytest.raises(RuntimeError) as err:
        file_io.load_weights(_Net(), partial, what="reward", source="r.pt", explain=lambda m: f"hint: {m.missing}")
    msg = str(err.value)
    assert msg.startswith("cannot load reward weights from 'r.pt': 2 missing, 0 unexpected, 0 with a wrong shape")
    assert msg.splitlines()[-1] == "  hint: ['head.weight', 'head.bias']"


# ------------------------------------------------------------------------------------------------ atomic writes
def test_atomic_save_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "model.pt"

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        file_io.atomic_save({"a": torch.zeros(2)}, target)
    assert list(target.parent.iterdir()) == []


def test_atomic_write_interrupted_keeps_previous_file(tmp_path):
    target = tmp_path / "model.pt"
    file_io.atomic_save({"a": torch.ones(2)}, target)
    with pytest.raises(KeyboardInterrupt):
        with file_io.atomic_write(target) as f:
            f.write(b"junk")
            raise KeyboardInterrupt
    assert torch.equal(torch.load(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_write_text_and_permissions(tmp_path):
    target = tmp_path / "list.txt"
    with file_io.atomic_write(target, "w", encoding="utf-8") as f:
        f.write("a\nb\n")
    assert target.read_text() == "a\nb\n"
    mask = os.umask(0)
    os.umask(mask)
    # An ordinary file (not mkstemp's private 0600), like open() would make.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(ValueError, match="mode"):
        with file_io.atomic_write(target, "a"):
            pass


def test_leftover_temps_maps_temps_to_their_final_names(tmp_path):
    (tmp_path / "kept.txt").write_text("")
    (tmp_path / ".hidden").write_text("")
    f = file_io.temp_sibling(tmp_path / "0000-cat-s0.mp4", suffix=".mp4")
    d = file_io.temp_sibling(tmp_path / "step_000010", directory=True)
    assert file_io.leftover_temps(tmp_path) == {f: "0000-cat-s0.mp4", d: "step_000010"}
    assert file_io.leftover_temps(tmp_path / "missing") == {}


def test_commit_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "step_000010"
    final.mkdir()
    (final / "old.bin").write_text("old")
    tmp = file_io.temp_sibling(final, directory=True)
    (tmp / "new.bin").write_text("new")
    assert file_io.commit(tmp, final) == final
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000010"]  # no temp or moved-aside copy left
