"""Checkpoint formats, folder layout and key conversion for the Wan2.1 DiT: the one place for all of it.

Users arrive with files written by several programs, and every one of them must load into our
``WanModel`` with no further renaming:

* HF base weights: ``Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors`` (or a sharded folder with
  ``diffusion_pytorch_model.safetensors.index.json``, as for the 14B) -- plain DiT keys
  (``blocks.0.self_attn.q.weight``).
* The released student ``Reward-Forcing-T2V-1.3B/rewardforcing.pt``: a *flat* state dict of the
  reference's DiT wrapper (docs/reference.md, Model), so every key carries a ``model.`` prefix.
* Reference trainer checkpoints ``checkpoint_model_NNNNNN/model.pt``: ``{"generator", "critic"}`` plus
  ``"generator_ema"`` once EMA has started (step > 200). The EMA copy was read from the FSDP-wrapped
  module and may carry ``_fsdp_wrapped_module.`` (or compile / activation-checkpoint) name segments.
* ``ode_init.pt`` (Self-Forcing): ``{"generator": ...}`` or ``{"model": ...}``.

``read_state_dict`` reads any of these files as they are, ``select_generator_weights`` picks the right
sub-dict and normalises the key names, ``load_weights`` loads with short, actionable error messages, and
``export_reference_checkpoint`` writes files that the reference ``inference.py`` can also read. Reading,
strict loading, key normalisation and atomic writing themselves live in ``file_io.py``; this module adds
the DiT's formats and folder layout on top.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .file_io import Mismatch, atomic_save, load_safetensors_file, load_torch_file, normalize_key
from .file_io import load_weights as _load_weights_strict

__all__ = [
    "WAN_1_3B_DIR", "WAN_14B_DIR", "VIDEO_REWARD_DIR", "VIDEO_REWARD_ALIASES", "VIDEOALIGN_COMMIT",
    "VIDEO_REWARD_TEMPLATE", "VIDEO_REWARD_TEMPLATE_URL",
    "RELEASED_GENERATOR", "WAN_VAE", "WAN_T5", "WAN_TOKENIZER", "DIT_CONFIG", "DIT_SAFETENSORS",
    "DIT_SAFETENSORS_INDEX", "DIT_NUM_KEYS", "ASSETS", "Asset",
    "read_state_dict", "select_generator_weights", "load_generator_state_dict",
    "load_weights", "export_reference_checkpoint", "merge_lora", "load_lora_file",
    "resolve_checkpoint_root", "require_file", "asset_path", "find_video_reward_dir",
]

# --------------------------------------------------------------------------------------------------
# Expected layout under the checkpoint root (default ``checkpoints/``). download_checkpoints.sh
# creates exactly these names; keep the two in sync.
# --------------------------------------------------------------------------------------------------
WAN_1_3B_DIR = "Wan2.1-T2V-1.3B"
WAN_14B_DIR = "Wan2.1-T2V-14B"
# The reference code says ``VideoReward`` while its README / download script say ``Videoreward``
# (docs/reference.md, quirk 11). We download to ``VideoReward`` and also accept the other spelling.
VIDEO_REWARD_DIR = "VideoReward"
VIDEO_REWARD_ALIASES = ("Videoreward",)
# VideoAlign's prompt_template.py holds the prompt VideoReward was trained with; it is part of VideoAlign's source
# (github.com/KwaiVGI/VideoAlign, MIT), not of the checkpoint. download_checkpoints.sh --train fetches it at this
# commit into the VideoReward folder; keep the two in sync.
VIDEOALIGN_COMMIT = "219ab9db64c045e5181a2202d11f686439351292"
VIDEO_REWARD_TEMPLATE = "prompt_template.py"
VIDEO_REWARD_TEMPLATE_URL = (f"https://raw.githubusercontent.com/KwaiVGI/VideoAlign/{VIDEOALIGN_COMMIT}/"
                             f"{VIDEO_REWARD_TEMPLATE}")
RELEASED_GENERATOR = "Reward-Forcing-T2V-1.3B/rewardforcing.pt"
# Files inside a Wan2.1-T2V-* folder.
WAN_VAE = "Wan2.1_VAE.pth"
WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER = "google/umt5-xxl"
DIT_CONFIG = "config.json"
DIT_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIT_SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# Number of state-dict keys of each DiT size (tests/golden/checkpoint_keys.tsv); used to name what a key
# count looks like in error messages. Causal and bidirectional models have identical keys.
DIT_NUM_KEYS = {"Wan2.1-T2V-1.3B": 825, "Wan2.1-T2V-14B": 1095}
# Model width (patch_embedding.weight.shape[0]) of each size, to recognise a wrong-size checkpoint.
_DIT_DIM = {1536: "Wan2.1-T2V-1.3B", 5120: "Wan2.1-T2V-14B"}

_RELEASED_DIR = RELEASED_GENERATOR.split("/")[0]
_DOWNLOAD_HINT = "run `bash download_checkpoints.sh`"
_DOWNLOAD_HINT_TRAIN = "run `bash download_checkpoints.sh --train`"


@dataclass(frozen=True)
class Asset:
    """One thing expected under the checkpoint root: where it lives and how to get it."""

    relpath: str
    what: str
    train_only: bool = False


ASSETS: dict[str, Asset] = {
    "wan_1_3b": Asset(WAN_1_3B_DIR, "Wan2.1-T2V-1.3B base weights folder"),
    "vae": Asset(f"{WAN_1_3B_DIR}/{WAN_VAE}", "Wan2.1 VAE weights"),
    "tokenizer": Asset(f"{WAN_1_3B_DIR}/{WAN_TOKENIZER}", "umt5-xxl tokenizer folder"),
    "released_generator": Asset(RELEASED_GENERATOR, "released Reward Forcing generator (rewardforcing.pt)"),
    "video_reward": Asset(VIDEO_REWARD_DIR, "VideoReward reward model folder", train_only=True),
}


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------
def download_hint(train: bool = False) -> str:
    """What to run to get missing files: ``download_checkpoints.sh``, with ``--train`` for training assets."""
    return _DOWNLOAD_HINT_TRAIN if train else _DOWNLOAD_HINT


def resolve_checkpoint_root(root: str | os.PathLike | None = "checkpoints") -> Path:
    """Return the checkpoint root as a Path, or raise FileNotFoundError saying how to create it.

    Checked up front so that a wrong ``--checkpoint_root`` fails with one clear line instead of a
    deep error from whichever loader touches the folder first.
    """
    path = Path(root if root is not None else "checkpoints").expanduser()
    if not path.is_dir():
        kind = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint root '{path}' {kind}. It should hold {WAN_1_3B_DIR}/ and "
            f"{_RELEASED_DIR}/; {_DOWNLOAD_HINT} (add `--root {path}` to download there, or pass the "
            f"folder where you already keep them)."
        )
    return path


def require_file(path: str | os.PathLike, what: str, *, train: bool = False) -> Path:
    """Return ``path`` if it exists (file or folder), else raise FileNotFoundError naming it.

    ``what`` says in words what the file is ("Wan2.1-T2V-1.3B base weights"); ``train`` selects the
    download hint (training assets need ``download_checkpoints.sh --train``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"missing {what}: '{p}' does not exist; {download_hint(train)}.")
    return p


def find_video_reward_dir(root: str | os.PathLike) -> Path:
    """Locate the VideoReward folder under ``root``, accepting the README's ``Videoreward`` spelling."""
    root = Path(root).expanduser()
    preferred = root / VIDEO_REWARD_DIR
    if preferred.is_dir():
        return preferred
    for alias in VIDEO_REWARD_ALIASES:
        candidate = root / alias
        if candidate.is_dir():
            warnings.warn(
                f"using '{candidate}' (the reference README's spelling); this project downloads the "
                f"reward model to '{preferred}'. Both work.",
                stacklevel=2,
            )
            return candidate
    raise FileNotFoundError(
        f"missing VideoReward reward model: neither '{preferred}' nor "
        f"{', '.join(repr(str(root / a)) for a in VIDEO_REWARD_ALIASES)} exists; {_DOWNLOAD_HINT_TRAIN}."
    )


def asset_path(root: str | os.PathLike, name: str, *, must_exist: bool = True) -> Path:
    """Path of a known asset (a key of ``ASSETS``) under ``root``; checks existence by default."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset '{name}'; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    if name == "video_reward" and must_exist:
        return find_video_reward_dir(root)
    path = Path(root).expanduser() / asset.relpath
    if must_exist:
        require_file(path, asset.what, train=asset.train_only)
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _load_sharded_safetensors(index_path: Path) -> dict[str, torch.Tensor]:
    """Read an HF ``*.safetensors.index.json`` and every shard it names (from the same folder)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"'{index_path}' is not a safetensors index (no valid 'weight_map'): {e}") from e
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"'{index_path}' names {len(shards)} shards but {len(missing)} are missing "
            f"(first: {missing[0]}); the download is incomplete -- {_DOWNLOAD_HINT} again."
        )
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_safetensors_file(index_path.parent / shard))
    absent = set(weight_map) - set(out)
    if absent:
        raise ValueError(f"{len(absent)} keys listed in '{index_path}' are in none of its shards, "
                         f"e.g. {sorted(absent)[:3]}")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint as stored, on the CPU.

    * ``*.safetensors``: one file; ``*.index.json``: sharded HF weights;
    * a folder: its ``diffusion_pytorch_model.safetensors.index.json`` (sharded) or
      ``diffusion_pytorch_model.safetensors`` (e.g. ``checkpoints/Wan2.1-T2V-1.3B``);
    * anything else (``.pt``, ``.pth``, ``.bin``): ``torch.load(weights_only=True)``, memory-mapped.

    A truncated or corrupt file raises ``file_io.CorruptFileError``: one line naming the file.

    Returns a flat ``{name: Tensor}`` for weight files; for trainer / ODE-init files it returns the
    nested dict as saved -- pass the result to ``select_generator_weights``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / DIT_SAFETENSORS_INDEX).is_file():
            return _load_sharded_safetensors(p / DIT_SAFETENSORS_INDEX)
        if (p / DIT_SAFETENSORS).is_file():
            return load_safetensors_file(p / DIT_SAFETENSORS)
        raise FileNotFoundError(
            f"'{p}' is a folder without DiT weights: expected '{DIT_SAFETENSORS_INDEX}' or "
            f"'{DIT_SAFETENSORS}' inside it. Pass the folder of a Wan2.1-T2V-* download or a weight file; "
            f"{_DOWNLOAD_HINT}."
        )
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint '{p}' does not exist; {_DOWNLOAD_HINT} or fix the path.")
    if p.name.endswith(".index.json"):
        return _load_sharded_safetensors(p)
    if p.suffix == ".safetensors":
        return load_safetensors_file(p)
    obj = load_torch_file(p)
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{p}' holds a {type(obj).__name__}, not a dict of weights.")
    return dict(obj)


# --------------------------------------------------------------------------------------------------
# Selecting and normalising
# --------------------------------------------------------------------------------------------------
_WRAPPER_PREFIX = "model."  # WanDiffusionWrapper stores the DiT as ``self.model``
_TRAINER_KEYS = ("generator", "generator_ema", "critic")


def _normalize_keys(sd: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where}: entry '{key}' is a {type(value).__name__}, not a tensor; this is not a "
                f"state dict of weights."
            )
        new = normalize_key(key, strip_prefix=_WRAPPER_PREFIX)
        if new in out:
            raise ValueError(f"{where}: keys '{origin[new]}' and '{key}' both map to '{new}' after removing "
                             f"wrapper prefixes; the checkpoint mixes two models.")
        out[new] = value
        origin[new] = key
    return out


def select_generator_weights(obj: Mapping[str, Any], use_ema: bool = False,
                             path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Pick the generator's weights out of any supported checkpoint and return plain DiT keys.

    * trainer checkpoint ``{"generator", "critic", "generator_ema"}``: ``generator_ema`` when
      ``use_ema`` else ``generator`` (a missing ``generator_ema`` is an error: EMA starts at step 200);
    * ``ode_init.pt``: ``{"generator": ...}`` or ``{"model": ...}``;
    * a flat state dict (released ``rewardforcing.pt``, HF safetensors): used as is. The released file
      already *is* the chosen weights, so ``use_ema`` only warns there (the reference's ``--use_ema``
      had no effect either).

    Keys lose a leading ``model.`` and any FSDP / compile / checkpoint-wrapper segments.
    """
    where = f"'{path}'" if path is not None else "checkpoint"
    if not isinstance(obj, Mapping):
        raise TypeError(f"{where} holds a {type(obj).__name__}, expected a dict of weights.")
    if not obj:
        raise ValueError(f"{where} is empty.")

    nested = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
    if any(k in nested for k in _TRAINER_KEYS):
        if use_ema:
            if "generator_ema" not in nested:
                raise ValueError(
                    f"--use_ema was given but {where} has no 'generator_ema' (keys present: "
                    f"{sorted(obj)}). The EMA copy is only saved after EMA starts (step 200 with the "
                    f"reference config); run without --use_ema to load 'generator'."
                )
            chosen, name = nested["generator_ema"], "generator_ema"
        else:
            if "generator" not in nested:
                raise ValueError(f"{where} has no 'generator' weights (keys present: {sorted(obj)}).")
            chosen, name = nested["generator"], "generator"
        return _normalize_keys(chosen, f"{where}['{name}']")

    for wrapper in ("model", "state_dict"):
        if wrapper in nested and len(nested) == 1:
            if use_ema:
                raise ValueError(
                    f"--use_ema was given but {where} holds a single model under '{wrapper}' "
                    f"(keys present: {sorted(obj)}), with no 'generator_ema'; run without --use_ema."
                )
            return _normalize_keys(nested[wrapper], f"{where}['{wrapper}']")

    if nested:
        raise ValueError(
            f"{where} is not a recognised checkpoint: it nests {sorted(nested)} but none of "
            f"'generator', 'generator_ema', 'model'. Expected a DiT state dict or a trainer checkpoint."
        )
    if use_ema:
        warnings.warn(
            f"--use_ema has no effect on {where}: it is a flat state dict (like the released "
            f"rewardforcing.pt), which already holds the weights to use.",
            stacklevel=2,
        )
    return _normalize_keys(obj, where)


def load_generator_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """``select_generator_weights(read_state_dict(path))``: plain DiT keys from any supported file."""
    return select_generator_weights(read_state_dict(path), use_ema=use_ema, path=path)


_LORA_SUFFIXES = (".base_layer.weight", ".base_layer.bias")


def load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The generator's adapters in a LoRA file: its ``generator_lora`` entry (LongLive's ``lora.pt`` holds
    ``{generator_lora, critic_lora, step}``), or the whole file when it is flat. Keys as saved (peft's)."""
    obj = read_state_dict(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("generator_lora"), Mapping):
        obj = obj["generator_lora"]
    if not isinstance(obj, Mapping) or not any(".lora_A." in k for k in obj):
        raise ValueError(f"'{path}' holds no LoRA adapters (no '.lora_A.' keys; top-level keys: "
                         f"{sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})")
    return dict(obj)


def merge_lora(state_dict: Mapping[str, torch.Tensor], scaling: float, *, adapter: str = "default",
               lora: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain DiT keys with low-rank adapters folded in: ``W = W0 + scaling * B @ A`` (peft's merge, in float32,
    stored back in ``W0``'s dtype).

    ``state_dict`` is what a peft-adapted model saves (``blocks.0.self_attn.q.base_layer.weight`` beside
    ``...q.lora_A.<adapter>.weight`` / ``lora_B``), or plain keys with the adapters given apart as ``lora``
    (a LoRA file: peft keys, with or without a ``base_model.model.`` prefix). ``scaling`` is ``alpha / rank``.
    An adapter without its base weight, or half an adapter, is an error naming the key.
    """
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    lora = {normalize_key(k.removeprefix("base_model.model."), strip_prefix=_WRAPPER_PREFIX): v
            for k, v in (lora or {}).items()}
    for key, value in {**state_dict, **lora}.items():
        for part in ("A", "B"):
            marker = f".lora_{part}.{adapter}.weight"
            if key.endswith(marker) or key.endswith(f".lora_{part}.weight"):
                layer = key[: key.rindex(f".lora_{part}.")]
                adapters.setdefault(layer, {})[part] = value
                break
        else:
            for suffix in _LORA_SUFFIXES:
                if key.endswith(suffix):
                    key = key[: -len(suffix)] + suffix.removeprefix(".base_layer")
            base[key] = value
    for layer, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter of '{layer}' has lora_{''.join(pair)} only; both A and B are needed")
        weight = base.get(f"{layer}.weight")
        if weight is None:
            raise ValueError(f"LoRA adapter '{layer}' has no base weight '{layer}.weight' to merge into")
        delta = pair["B"].float().to(weight.device) @ pair["A"].float().to(weight.device)
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA adapter '{layer}': B @ A is {tuple(delta.shape)}, the weight "
                             f"{tuple(weight.shape)}")
        base[f"{layer}.weight"] = (weight.float() + scaling * delta).to(weight.dtype)
    return base


# --------------------------------------------------------------------------------------------------
# Loading into a module
# --------------------------------------------------------------------------------------------------
def _describe_count(n: int) -> str:
    for name, count in DIT_NUM_KEYS.items():
        if n == count:
            return f"{n} keys of a {name} DiT"
    return f"{n} keys"


def _likely_cause(m: Mismatch) -> str:
    """The DiT-specific "likely cause" line of a failed ``load_weights``."""
    expected, given = m.expected, m.given
    known = [f"{who} has {_describe_count(len(sd))}"
             for who, sd in (("the module", expected), ("the checkpoint", given)) if len(sd) in DIT_NUM_KEYS.values()]
    sizes = f" ({'; '.join(known)})" if known else ""
    if "patch_embedding.weight" in given and "patch_embedding.weight" in expected:
        have = _DIT_DIM.get(given["patch_embedding.weight"].shape[0])
        want = _DIT_DIM.get(expected["patch_embedding.weight"].shape[0])
        if m.shapes and have != want:
            return (f"Likely cause: wrong model size -- the checkpoint looks like a {have or 'different'} "
                    f"DiT but the module is a {want or 'different'} one. Check the model flavor/config." + sizes)
    if m.unexpected and not (set(given) & set(expected)):
        prefixes = {k.split(".", 1)[0] for k in m.unexpected}
        stripped = {k.split(".", 1)[-1] for k in m.unexpected}
        if len(prefixes) == 1 and stripped & set(expected):
            return (f"Likely cause: every key carries the prefix '{prefixes.pop()}.'; pass the dict through "
                    f"select_generator_weights() first.")
        return ("Likely cause: this is not a Wan DiT checkpoint (a VAE, T5 or reward-model file?), or a "
                "trainer checkpoint that was not unpacked with select_generator_weights().")
    if m.shapes:
        return "Likely cause: wrong model size or a different architecture/config." + sizes
    if m.missing and not m.unexpected:
        return "Likely cause: a truncated or partial checkpoint (or a model with more layers)." + sizes
    if m.unexpected and not m.missing:
        return "Likely cause: a bigger model's checkpoint (more layers) or extra modules saved alongside." + sizes
    return "Likely cause: wrong model size or not a DiT checkpoint of this architecture." + sizes


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                 what: str = "generator", source: str | os.PathLike | None = None):
    """``file_io.load_weights`` (strict, summarised, meta-device aware) with hints about Wan DiT sizes and
    checkpoint formats in its error message."""
    return _load_weights_strict(module, state_dict, strict=strict, what=what, source=source, explain=_likely_cause)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _to_reference_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in _normalize_keys(sd, "export").items():
        t = value.detach().to("cpu")
        # torch.save writes a view's whole storage; copy views so the file holds only this tensor.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        out[_WRAPPER_PREFIX + key] = t
    return out


def export_model_checkpoint(path: str | os.PathLike, model_sd: Mapping[str, torch.Tensor]) -> Path:
    """Write one model ``{"model": ...}`` (e.g. a trained teacher), keys as :func:`export_reference_checkpoint`
    writes them; it loads with ``load_generator_state_dict`` and as ``training.teacher_ckpt``."""
    return atomic_save({"model": _to_reference_keys(model_sd)}, path)


def export_reference_checkpoint(path: str | os.PathLike, generator_sd: Mapping[str, torch.Tensor],
                                critic_sd: Mapping[str, torch.Tensor] | None = None,
                                generator_ema_sd: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a reference-format trainer checkpoint ``{"generator", "critic", "generator_ema"}``.

    Every key gets the ``model.`` prefix of the reference's DiT wrapper (after removing
    any prefix / wrapper segments it already had), so the file loads both here
    (``load_generator_state_dict(path, use_ema=...)``) and in reference tooling. Entries passed as
    None are left out, as the reference does for ``generator_ema`` before EMA starts.
    """
    ckpt = {"generator": _to_reference_keys(generator_sd)}
    if critic_sd is not None:
        ckpt["critic"] = _to_reference_keys(critic_sd)
    if generator_ema_sd is not None:
        ckpt["generator_ema"] = _to_reference_keys(generator_ema_sd)
    return atomic_save(ckpt, path)
