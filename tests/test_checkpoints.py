"""Checkpoint formats, key normalisation, error messages and atomic writes (reward_forcing.checkpoints)."""
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from reward_forcing import checkpoints as ck
from reward_forcing.file_io import CorruptFileError


class TinyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.self_attn = nn.Module()
        self.self_attn.q = nn.Linear(dim, dim)
        self.self_attn.norm_q = nn.RMSNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class TinyDiT(nn.Module):
    """A module with Wan DiT-like parameter names (patch_embedding, blocks.N.*, head.*)."""

    def __init__(self, dim=8, layers=2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(dim, 16)
        self.head.modulation = nn.Parameter(torch.zeros(1, 2, dim))


def dit_sd(dim=8, layers=2):
    return {k: torch.randn_like(v) for k, v in TinyDiT(dim, layers).state_dict().items()}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- read
def test_read_pt_and_pth(tmp_path):
    sd = dit_sd()
    for name in ("w.pt", "w.pth"):
        torch.save(sd, tmp_path / name)
        assert_same(ck.read_state_dict(tmp_path / name), sd)


def test_read_legacy_serialisation_falls_back_without_mmap(tmp_path):
    sd = dit_sd()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(ck.read_state_dict(tmp_path / "old.pt"), sd)


def test_read_safetensors_file_and_folder(tmp_path):
    from safetensors.torch import save_file

    sd = dit_sd()
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert_same(ck.read_state_dict(tmp_path / "w.safetensors"), sd)
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    save_file(sd, str(folder / ck.DIT_SAFETENSORS))
    assert_same(ck.read_state_dict(folder), sd)


def test_read_sharded_folder_and_index(tmp_path):
    from safetensors.torch import save_file

    sd = dit_sd()
    keys = sorted(sd)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, names in halves.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / shard))
        weight_map.update({k: shard for k in names})
    (tmp_path / ck.DIT_SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same(ck.read_state_dict(tmp_path), sd)
    assert_same(ck.read_state_dict(tmp_path / ck.DIT_SAFETENSORS_INDEX), sd)
    # An interrupted download: a shard is missing.
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ck.read_state_dict(tmp_path)


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="download_checkpoints.sh"):
        ck.read_state_dict(tmp_path)  # folder without weights
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptFileError, match="garbage.pt is not a valid PyTorch checkpoint"):
        ck.read_state_dict(tmp_path / "garbage.pt")


def test_read_refuses_arbitrary_pickles(tmp_path):
    torch.save({"generator": dit_sd(), "config": _Custom()}, tmp_path / "pickled.pt")
    with pytest.raises(CorruptFileError, match=r"pickled.pt contains Python objects other than tensors \(.*_Custom"):
        ck.read_state_dict(tmp_path / "pickled.pt")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_files_give_one_line_naming_the_file(tmp_path):
    """Every format read_state_dict accepts: a half-downloaded file is named, with what is wrong and the fix."""
    from safetensors.torch import save_file

    sd = dit_sd()
    torch.save(sd, tmp_path / "rewardforcing.pt")
    save_file(sd, str(tmp_path / "gen.safetensors"))
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    save_file(sd, str(folder / ck.DIT_SAFETENSORS))
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    save_file(sd, str(tmp_path / shard))
    (tmp_path / ck.DIT_SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {k: shard for k in sd}}))
    cases = {tmp_path / "rewardforcing.pt": "not a valid PyTorch checkpoint",
             tmp_path / "gen.safetensors": "not a valid safetensors file",
             folder: "not a valid safetensors file",
             tmp_path / ck.DIT_SAFETENSORS_INDEX: "not a valid safetensors file"}
    broken = {tmp_path / "rewardforcing.pt": tmp_path / "rewardforcing.pt",
              tmp_path / "gen.safetensors": tmp_path / "gen.safetensors",
              folder: folder / ck.DIT_SAFETENSORS,
              tmp_path / ck.DIT_SAFETENSORS_INDEX: tmp_path / shard}
    for source, what in cases.items():
        _truncate(broken[source])
        with pytest.raises(CorruptFileError) as err:
            ck.read_state_dict(source)
        msg = str(err.value)
        assert msg.startswith(f"{broken[source]} is {what}") and "truncated or corrupt" in msg, msg
        assert "re-download it" in msg and "\n" not in msg


class _Custom:
    pass


# ------------------------------------------------------------------------------------------- select
def test_flat_released_checkpoint_strips_model_prefix():
    sd = dit_sd()
    released = {"model." + k: v for k, v in sd.items()}
    assert_same(ck.select_generator_weights(released), sd)


def test_plain_dit_state_dict_unchanged():
    sd = dit_sd()
    assert_same(ck.select_generator_weights(sd), sd)


def test_use_ema_on_flat_file_warns_and_continues():
    sd = dit_sd()
    released = {"model." + k: v for k, v in sd.items()}
    with pytest.warns(UserWarning, match="no effect"):
        out = ck.select_generator_weights(released, use_ema=True, path="rewardforcing.pt")
    assert_same(out, sd)


def test_fsdp_compile_and_checkpoint_wrapper_segments_are_removed():
    t = torch.zeros(1)
    wrapped = {"model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight": t,
               "_orig_mod.model.head.head.weight": t, "module.model.patch_embedding.bias": t,
               "blocks.0.self_attn.q.weight": t}
    assert sorted(ck.select_generator_weights(wrapped)) == [
        "blocks.0.ffn.0.weight", "blocks.0.self_attn.q.weight", "head.head.weight", "patch_embedding.bias"]


def test_trainer_checkpoint_selection():
    gen, ema, critic = dit_sd(), dit_sd(), dit_sd()
    ckpt = {
        "generator": {"model." + k: v for k, v in gen.items()},
        "critic": {"model." + k: v for k, v in critic.items()},
        "generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in ema.items()},
    }
    assert_same(ck.select_generator_weights(ckpt), gen)
    assert_same(ck.select_generator_weights(ckpt, use_ema=True), ema)


def test_use_ema_without_ema_names_path_keys_and_fix():
    ckpt = {"generator": {"model.x": torch.zeros(1)}, "critic": {"model.x": torch.zeros(1)}}
    with pytest.raises(ValueError) as e:
        ck.select_generator_weights(ckpt, use_ema=True, path="logs/checkpoint_model_000100/model.pt")
    msg = str(e.value)
    assert "checkpoint_model_000100" in msg and "'critic'" in msg and "'generator'" in msg
    assert "200" in msg and "without --use_ema" in msg


def test_ode_init_formats():
    sd = dit_sd()
    assert_same(ck.select_generator_weights({"generator": {"model." + k: v for k, v in sd.items()}}), sd)
    assert_same(ck.select_generator_weights({"model": dict(sd)}), sd)
    with pytest.raises(ValueError, match="generator_ema"):
        ck.select_generator_weights({"model": dict(sd)}, use_ema=True)


def test_unrecognised_and_colliding_checkpoints():
    with pytest.raises(ValueError, match="not a recognised"):
        ck.select_generator_weights({"optimizer": {"a": torch.zeros(1)}, "foo": {"b": torch.zeros(1)}})
    with pytest.raises(ValueError, match="both map to"):
        ck.select_generator_weights({"model.a": torch.zeros(1), "a": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a tensor"):
        ck.select_generator_weights({"model.a": torch.zeros(1), "step": 3})


# --------------------------------------------------------------------------------------------- load
def test_load_weights_roundtrip():
    sd = dit_sd()
    m = TinyDiT()
    ck.load_weights(m, sd)
    assert_same(m.state_dict(), sd)


def test_load_weights_summarises_mismatches():
    big = dit_sd(layers=40)  # many keys: the message must stay short anyway
    m = TinyDiT(layers=2)
    with pytest.raises(RuntimeError) as e:
        ck.load_weights(m, big, source="x.pt")
    msg = str(e.value)
    n_unexpected = len(big) - len(m.state_dict())
    assert f"0 missing, {n_unexpected} unexpected" in msg
    assert "x.pt" in msg and "more)" in msg and "Likely cause" in msg
    assert len(msg) < 1200 and msg.count("\n") < 10


def test_load_weights_shape_mismatch_is_caught_first():
    m = TinyDiT(dim=8)
    with pytest.raises(RuntimeError) as e:
        ck.load_weights(m, dit_sd(dim=16), strict=False, what="critic")
    msg = str(e.value)
    assert "critic" in msg and "wrong shape" in msg and "patch_embedding.weight: checkpoint (16, 4, 1, 2, 2)" in msg
    assert len(msg) < 1500


def test_load_weights_names_known_model_sizes_and_prefix_hint():
    m = TinyDiT()
    sd = {"model." + k: v for k, v in dit_sd().items()}
    with pytest.raises(RuntimeError, match="prefix 'model.'"):
        ck.load_weights(m, sd)
    assert ck._describe_count(825) == "825 keys of a Wan2.1-T2V-1.3B DiT"
    with pytest.raises(RuntimeError, match="not a Wan DiT checkpoint"):
        ck.load_weights(m, {"encoder.conv1.weight": torch.zeros(3), "decoder.conv1.weight": torch.zeros(3)})


def test_load_weights_non_strict_reports_missing():
    sd = dit_sd()
    del sd["head.head.bias"]
    result = ck.load_weights(TinyDiT(), sd, strict=False)
    assert result.missing_keys == ["head.head.bias"]


def test_load_weights_meta_module_assigns_and_keeps_dtype():
    sd = {k: v.to(torch.bfloat16) for k, v in dit_sd().items()}
    with torch.device("meta"):
        m = TinyDiT()
    ck.load_weights(m, sd)
    p = m.blocks[0].self_attn.q.weight
    assert not p.is_meta and p.dtype == torch.float32 and isinstance(p, nn.Parameter)
    assert torch.equal(p, sd["blocks.0.self_attn.q.weight"].float())
    # Missing weights on a meta module would stay uninitialised: refused even when not strict.
    with torch.device("meta"):
        m2 = TinyDiT()
    del sd["head.head.bias"]
    with pytest.raises(RuntimeError, match="meta device"):
        ck.load_weights(m2, sd, strict=False)


# -------------------------------------------------------------------------------------------- write
def test_export_read_select_roundtrip(tmp_path):
    gen, critic, ema = dit_sd(), dit_sd(), dit_sd()
    # Inputs may carry wrapper names already; the file gets exactly one ``model.`` prefix.
    gen_wrapped = {"_orig_mod." + k: v for k, v in gen.items()}
    path = ck.export_reference_checkpoint(tmp_path / "checkpoint_model_000600" / "model.pt", gen_wrapped,
                                          critic_sd=critic, generator_ema_sd=ema)
    raw = ck.read_state_dict(path)
    assert sorted(raw) == ["critic", "generator", "generator_ema"]
    assert all(k.startswith("model.") and not k.startswith("model.model.") for k in raw["generator"])
    assert_same(ck.select_generator_weights(raw, path=path), gen)
    assert_same(ck.load_generator_state_dict(path, use_ema=True), ema)
    m = TinyDiT()
    ck.load_weights(m, ck.load_generator_state_dict(path), source=path)
    assert_same(m.state_dict(), gen)


def test_export_without_ema_omits_it(tmp_path):
    path = ck.export_reference_checkpoint(tmp_path / "m.pt", dit_sd())
    assert sorted(ck.read_state_dict(path)) == ["generator"]
    with pytest.raises(ValueError, match="without --use_ema"):
        ck.load_generator_state_dict(path, use_ema=True)


def test_export_copies_views_only(tmp_path):
    big = torch.arange(1000.0)
    path = ck.export_reference_checkpoint(tmp_path / "m.pt", {"head.head.bias": big[:4]})
    assert path.stat().st_size < 2000


# -------------------------------------------------------------------------------------------- paths
def test_layout_constants():
    assert ck.WAN_1_3B_DIR == "Wan2.1-T2V-1.3B" and ck.WAN_14B_DIR == "Wan2.1-T2V-14B"
    assert ck.VIDEO_REWARD_DIR == "VideoReward"
    assert ck.RELEASED_GENERATOR == "Reward-Forcing-T2V-1.3B/rewardforcing.pt"
    assert ck.WAN_VAE == "Wan2.1_VAE.pth" and ck.WAN_T5 == "models_t5_umt5-xxl-enc-bf16.pth"
    assert ck.WAN_TOKENIZER == "google/umt5-xxl"


def test_missing_paths_explain_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ck.resolve_checkpoint_root(tmp_path / "checkpoints")
    assert "checkpoints" in str(e.value) and "download_checkpoints.sh" in str(e.value)
    assert ck.resolve_checkpoint_root(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError) as e:
        ck.require_file(tmp_path / "Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B base weights")
    assert "Wan2.1-T2V-1.3B base weights" in str(e.value) and "`bash download_checkpoints.sh`" in str(e.value)
    with pytest.raises(FileNotFoundError, match="--train"):
        ck.asset_path(tmp_path, "video_reward")
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        ck.asset_path(tmp_path, "vae")
    assert ck.asset_path(tmp_path, "vae", must_exist=False) == tmp_path / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth"


def test_video_reward_folder_either_spelling(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train"):
        ck.find_video_reward_dir(tmp_path)
    (tmp_path / "Videoreward").mkdir()
    with pytest.warns(UserWarning, match="Videoreward"):
        assert ck.asset_path(tmp_path, "video_reward") == tmp_path / "Videoreward"
    (tmp_path / "VideoReward").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.find_video_reward_dir(tmp_path) == tmp_path / "VideoReward"


# ------------------------------------------------------------------------------ download_checkpoints.sh
SCRIPT = Path(__file__).resolve().parents[1] / "download_checkpoints.sh"
SYSTEM_PATH = "/usr/bin:/bin"

# Stands in for `hf` / `huggingface-cli`: logs its arguments and creates the files the real repos have.
FAKE_HF = r"""#!/usr/bin/env bash
set -euo pipefail
echo "$(basename "$0") $*" >> "$FAKE_HF_LOG"
[[ "$1" == download ]]; shift
repo="$1"; shift
files=(); dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in --local-dir) dir="$2"; shift 2 ;; *) files+=("$1"); shift ;; esac
done
mkdir -p "$dir/.cache/huggingface"
case "$repo" in
  Wan-AI/Wan2.1-T2V-1.3B)
    mkdir -p "$dir/google/umt5-xxl"
    touch "$dir/config.json" "$dir/diffusion_pytorch_model.safetensors" "$dir/Wan2.1_VAE.pth" \
          "$dir/models_t5_umt5-xxl-enc-bf16.pth" "$dir/google/umt5-xxl/tokenizer.json" ;;
  JaydenLu666/Reward-Forcing-T2V-1.3B) touch "$dir/rewardforcing.pt" ;;
  Wan-AI/Wan2.1-T2V-14B)
    touch "$dir/config.json" "$dir/diffusion_pytorch_model-00001-of-00002.safetensors" \
          "$dir/diffusion_pytorch_model-00002-of-00002.safetensors"
    echo '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}' \
      > "$dir/diffusion_pytorch_model.safetensors.index.json" ;;
  KlingTeam/VideoReward) mkdir -p "$dir/checkpoint-11352"; touch "$dir/model_config.json" ;;
  gdhe17/Self-Forcing|zhuhz22/Causal-Forcing|Efficient-Large-Model/LongLive-1.3B|TencentARC/RollingForcing)
    for f in "${files[@]}"; do mkdir -p "$dir/$(dirname "$f")"; echo x > "$dir/$f"; done ;;
  *) echo "unexpected repo $repo" >&2; exit 3 ;;
esac
"""


# Stands in for curl: logs its arguments and writes the -o file as a copy of $FAKE_CURL_SOURCE.
FAKE_CURL = r"""#!/usr/bin/env bash
set -euo pipefail
echo "curl $*" >> "$FAKE_CURL_LOG"
out=""
while [[ $# -gt 0 ]]; do case "$1" in -o) out="$2"; shift 2 ;; *) shift ;; esac; done
cp "$FAKE_CURL_SOURCE" "$out"
"""
VIDEOALIGN_TEMPLATE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "videoalign_prompt_template.py"


def _no_system_hf():
    return shutil.which("hf", path=SYSTEM_PATH) is None and shutil.which("huggingface-cli", path=SYSTEM_PATH) is None


needs_clean_path = pytest.mark.skipif(not _no_system_hf(), reason="an hf CLI is installed in /usr/bin or /bin")


def _run_script(tmp_path, *args, cli="hf", curl_source=VIDEOALIGN_TEMPLATE_FIXTURE):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if cli:
        fake = bin_dir / cli
        fake.write_text(FAKE_HF)
        fake.chmod(0o755)
    fake_curl = bin_dir / "curl"  # shadows any real curl: tests never touch the network
    fake_curl.write_text(FAKE_CURL)
    fake_curl.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", "FAKE_HF_LOG": str(tmp_path / "calls.log"), "HOME": str(tmp_path),
           "FAKE_CURL_LOG": str(tmp_path / "curl.log"), "FAKE_CURL_SOURCE": str(curl_source)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def _calls(tmp_path):
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_download_script_is_executable_and_has_help(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    r = _run_script(tmp_path, "--help", cli=None)
    assert r.returncode == 0 and "--train" in r.stdout and "--root" in r.stdout
    r = _run_script(tmp_path, "--bogus", cli=None)
    assert r.returncode == 2 and "bogus" in r.stderr


@needs_clean_path
def test_download_script_inference_then_train_idempotent(tmp_path):
    r = _run_script(tmp_path)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == [
        f"hf download Wan-AI/Wan2.1-T2V-1.3B --local-dir checkpoints/{ck.WAN_1_3B_DIR}",
        "hf download JaydenLu666/Reward-Forcing-T2V-1.3B --local-dir checkpoints/Reward-Forcing-T2V-1.3B",
    ]
    root = tmp_path / "checkpoints"
    assert (root / ck.RELEASED_GENERATOR).is_file()
    for name in ("vae", "tokenizer"):
        assert ck.asset_path(root, name).exists()
    assert (root / ck.WAN_1_3B_DIR / ck.DIT_SAFETENSORS).is_file() and (root / ck.WAN_1_3B_DIR / ck.WAN_T5).is_file()

    (tmp_path / "calls.log").unlink()
    r = _run_script(tmp_path)
    assert r.returncode == 0 and _calls(tmp_path) == [] and r.stdout.count("already present") == 2

    r = _run_script(tmp_path, "--train")
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert calls[0] == f"hf download Wan-AI/Wan2.1-T2V-14B --local-dir checkpoints/{ck.WAN_14B_DIR}"
    assert calls[1] == f"hf download KlingTeam/VideoReward --local-dir checkpoints/{ck.VIDEO_REWARD_DIR}"
    assert calls[2].startswith("hf download gdhe17/Self-Forcing checkpoints/ode_init.pt --local-dir checkpoints/")
    assert calls[3].startswith("hf download gdhe17/Self-Forcing vidprom_filtered_extended.txt --local-dir prompts/")
    assert len(calls) == 4
    assert (root / "ode_init.pt").read_text() == "x\n"
    assert (tmp_path / "prompts" / "vidprom_filtered_extended.txt").is_file()
    assert ck.find_video_reward_dir(root) == root / ck.VIDEO_REWARD_DIR
    # Staging folders are cleaned up; only the expected names remain.
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [ck.WAN_1_3B_DIR, ck.WAN_14B_DIR, ck.VIDEO_REWARD_DIR, "Reward-Forcing-T2V-1.3B", "ode_init.pt"])

    (tmp_path / "calls.log").unlink()
    r = _run_script(tmp_path, "--train")
    assert r.returncode == 0 and _calls(tmp_path) == [] and r.stdout.count("already present") == 7


@needs_clean_path
def test_download_script_root_alias_and_incomplete_shards(tmp_path):
    root = tmp_path / "weights"
    (root / "Videoreward" / "checkpoint-11352").mkdir(parents=True)
    (root / "Videoreward" / "model_config.json").touch()
    r = _run_script(tmp_path, "--train", "--root", str(root), cli="huggingface-cli")
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    assert all(c.startswith("huggingface-cli download ") for c in calls)
    assert not any("VideoReward" in c for c in calls) and "Videoreward" in r.stdout
    assert any(c.endswith(f"--local-dir {root}/{ck.WAN_1_3B_DIR}") for c in calls)
    # A 14B download interrupted before its last shard is fetched again.
    (root / ck.WAN_14B_DIR / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    (tmp_path / "calls.log").unlink()
    r = _run_script(tmp_path, "--train", "--root", str(root), cli="huggingface-cli")
    assert _calls(tmp_path) == [f"huggingface-cli download Wan-AI/Wan2.1-T2V-14B --local-dir {root}/{ck.WAN_14B_DIR}"]


@needs_clean_path
def test_download_script_without_cli_says_what_to_install(tmp_path):
    r = _run_script(tmp_path, cli=None)
    assert r.returncode == 1
    assert "pip install" in r.stderr and "huggingface_hub[cli]" in r.stderr
    assert _calls(tmp_path) == []


@needs_clean_path
def test_download_script_reports_failed_download(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text("#!/usr/bin/env bash\necho 'network unreachable' >&2\nexit 7\n")
    (bin_dir / "hf").chmod(0o755)
    r = _run_script(tmp_path, cli=None)
    assert r.returncode == 1
    assert "downloading Wan-AI/Wan2.1-T2V-1.3B failed" in r.stderr and "Re-run" in r.stderr


def _curl_calls(tmp_path):
    log = tmp_path / "curl.log"
    return log.read_text().splitlines() if log.exists() else []


@needs_clean_path
def test_download_script_fetches_videoalign_template_pinned_and_once(tmp_path):
    from reward_forcing.models.video_reward import read_prompt_template

    assert ck.VIDEO_REWARD_TEMPLATE_URL in SCRIPT.read_text()  # the script and the loader name the same commit
    r = _run_script(tmp_path, "--train")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "checkpoints" / ck.VIDEO_REWARD_DIR / ck.VIDEO_REWARD_TEMPLATE
    assert _curl_calls(tmp_path) == [f"curl -fsSL --retry 3 -o checkpoints/{ck.VIDEO_REWARD_DIR}/"
                                     f".download-{ck.VIDEO_REWARD_TEMPLATE} {ck.VIDEO_REWARD_TEMPLATE_URL}"]
    assert dest.read_bytes() == VIDEOALIGN_TEMPLATE_FIXTURE.read_bytes()
    assert read_prompt_template(dest, "detailed_special")
    assert sorted(p.name for p in dest.parent.iterdir()) == [".cache", "checkpoint-11352", "model_config.json",
                                                            ck.VIDEO_REWARD_TEMPLATE]
    (tmp_path / "curl.log").unlink()
    r = _run_script(tmp_path, "--train")
    assert r.returncode == 0 and _curl_calls(tmp_path) == [] and f"already present at {dest.relative_to(tmp_path)}" in r.stdout

    # Next to the reference README's spelling when that is the folder in use.
    root = tmp_path / "alias"
    (root / "Videoreward" / "checkpoint-11352").mkdir(parents=True)
    (root / "Videoreward" / "model_config.json").touch()
    r = _run_script(tmp_path, "--train", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert (root / "Videoreward" / ck.VIDEO_REWARD_TEMPLATE).is_file() and not (root / ck.VIDEO_REWARD_DIR).exists()


@needs_clean_path
def test_download_script_fetches_the_community_checkpoints_where_their_configs_look(tmp_path):
    from reward_forcing.config import load_config

    r = _run_script(tmp_path, "--community")
    assert r.returncode == 0, r.stderr
    community = _calls(tmp_path)[2:]  # after the inference assets
    assert [c.split(" --local-dir")[0] for c in community] == [
        "hf download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt",
        "hf download zhuhz22/Causal-Forcing chunkwise/causal_forcing.pt",
        "hf download zhuhz22/Causal-Forcing framewise/causal_forcing.pt",
        "hf download Efficient-Large-Model/LongLive-1.3B models/longlive_base.pt",
        "hf download Efficient-Large-Model/LongLive-1.3B models/lora.pt",
        "hf download TencentARC/RollingForcing checkpoints/rolling_forcing_dmd.pt"]
    # every file a config of configs/community/ names is where the script puts it (the configs name files under
    # the repository's checkpoints/; compared relative to that root)
    root = tmp_path / "checkpoints"
    repo = SCRIPT.parent
    for config in sorted((repo / "configs" / "community").glob("*.yaml")):
        cfg = load_config(config)
        for path in filter(None, (cfg.model.checkpoint, cfg.model.lora)):
            relative = Path(path).resolve().relative_to((repo / "checkpoints").resolve())
            assert (root / relative).is_file(), (config.name, relative)
    assert sorted(p.name for p in (root / "community").iterdir()) == sorted(
        ["self_forcing_dmd.pt", "causal_forcing_chunkwise.pt", "causal_forcing_framewise.pt", "longlive_base.pt",
         "longlive_lora.pt", "rolling_forcing_dmd.pt"])
    (tmp_path / "calls.log").unlink()
    r = _run_script(tmp_path, "--community")
    assert r.returncode == 0 and _calls(tmp_path) == []


@needs_clean_path
def test_download_script_rejects_a_wrong_template_download(tmp_path):
    page = tmp_path / "error.html"
    page.write_text("<html>rate limited</html>\n")
    r = _run_script(tmp_path, "--train", curl_source=page)
    assert r.returncode == 1 and ck.VIDEO_REWARD_TEMPLATE_URL in r.stderr
    folder = tmp_path / "checkpoints" / ck.VIDEO_REWARD_DIR
    assert not (folder / ck.VIDEO_REWARD_TEMPLATE).exists()
    assert not list(folder.glob(".download-*"))  # nothing half-written left behind
