"""Reading the released VideoReward folder (Hugging Face ``KlingTeam/VideoReward``) into our classes.

What the release holds, and all this module reads::

    model_config.json          data_config / model_config / peft_lora_config / inference_config sections
    checkpoint-<N>/model.pth   the full PEFT-wrapped state dict, keys in the transformers 4.45 Qwen2-VL layout
    checkpoint-<N>/tokenizer/  Qwen2-VL's tokenizer with the three reward tokens added

plus VideoAlign's ``prompt_template.py`` (a file of the VideoAlign source, passed as ``prompt_template_file``;
see ``prompt.py``). ``model.pth`` holds every weight, so the base model's weights are never needed, only its
architecture: Qwen2-VL-2B-Instruct's is built in (``QWEN2_VL_2B_INSTRUCT``); a ``model_name_or_path`` that is a
local folder with a ``config.json`` is read instead. Where the folder lives and how to download it is the
caller's business (``reward_forcing/checkpoints.py``).
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2VLConfig

from ...file_io import load_torch_file, load_weights
from .model import VideoRewardModel, apply_lora, normalization_from_config
from .preprocess import VideoPreprocessConfig
from .prompt import DEFAULT_PROMPT_TEMPLATE, REWARD_TOKENS, read_prompt_template

__all__ = ["QWEN2_VL_2B_INSTRUCT", "LoadedVideoReward", "to_current_layout", "load_state_file",
           "select_checkpoint_dir", "load_video_reward"]

MODEL_CONFIG = "model_config.json"
WEIGHTS = "model.pth"
TOKENIZER_DIR = "tokenizer"

# Qwen2-VL-2B-Instruct's architecture (from its public config.json). model.pth holds every weight, so only these
# numbers are needed; every shape is checked by the strict state-dict load, rms_norm_eps and rope_theta are not.
QWEN2_VL_2B_INSTRUCT = {
    "model_type": "qwen2_vl",
    "text_config": {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "hidden_act": "quick_gelu", "mlp_ratio": 4,
        "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
}
QWEN2_VL_2B_NAME = "Qwen2-VL-2B-Instruct"

_PEFT = "base_model.model."


# --------------------------------------------------------------------------------------------------
# Key layout and files
# --------------------------------------------------------------------------------------------------
def to_current_layout(key: str) -> str:
    """Rename a PEFT-wrapped Qwen2-VL key from the transformers 4.45 layout (the release's) to the >= 4.52 one.

    4.45: ``base_model.model.model.layers.0...`` (language model directly under ``model``) and
    ``base_model.model.visual...``. Now: ``base_model.model.model.language_model.layers.0...`` and
    ``base_model.model.model.visual...``. Keys already in the new layout, ``lm_head`` and ``rm_head`` are
    returned unchanged.
    """
    if key.startswith(_PEFT + "visual."):
        return _PEFT + "model." + key[len(_PEFT):]
    inner = _PEFT + "model."
    if key.startswith(inner):
        rest = key[len(inner):]
        if not rest.startswith(("language_model.", "visual.")):
            return inner + "language_model." + rest
    return key


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict of tensors (memory-mapped, no code run); one-line errors naming the file."""
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def select_checkpoint_dir(folder: str | os.PathLike, step: int | None = None) -> Path:
    """``folder/checkpoint-<step>``, or the one with the largest step when ``step`` is None or < 0."""
    folder = Path(folder)
    found = {int(m.group(1)): p for p in folder.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    if not found:
        raise FileNotFoundError(f"no checkpoint-<N> folder in '{folder}'")
    if step is None or step < 0:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"'{folder / f'checkpoint-{step}'}' does not exist; available steps: {sorted(found)}")
    return found[step]


def _base_config(name: str, source: Path) -> Qwen2VLConfig:
    """The architecture of ``model_name_or_path``: a local folder's config.json, else Qwen2-VL-2B's built-in."""
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return Qwen2VLConfig.from_pretrained(str(local))
    if local.name == QWEN2_VL_2B_NAME:
        return Qwen2VLConfig(**copy.deepcopy(QWEN2_VL_2B_INSTRUCT))
    raise ValueError(f"'{source}': model_name_or_path {name!r} is neither {QWEN2_VL_2B_NAME} nor a local folder "
                     f"with a config.json")


def _embedding_rows(state: Mapping[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if key.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight")):
            return int(value.shape[0])
    return None


def _drop_tied_lm_head(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> str:
    """Handle ``lm_head.weight``, which scoring never uses; returns its key (which may be absent).

    When the model ties lm_head to the input embedding (Qwen2-VL-2B does), loading both keys would write
    lm_head's copy *into the embedding* (same storage, loaded last). The file's copy is dropped so that the
    embedding comes from ``embed_tokens.weight``; a warning says so if the two differ.
    """
    net = model.get_base_model()
    head = _PEFT + "lm_head.weight"
    embed = next((k for k in state if k.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight"))), None)
    if net.lm_head.weight is net.get_input_embeddings().weight and head in state:
        if embed is not None and not torch.equal(state[head], state[embed]):
            warnings.warn(f"'{source}': lm_head.weight differs from embed_tokens.weight but the model ties them; "
                          f"keeping embed_tokens (lm_head is not used for rewards)", stacklevel=4)
        del state[head]
    return head


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load a full state dict; every key must match (``lm_head.weight`` may be absent: it is unused)."""
    optional = _drop_tied_lm_head(model, state, source)
    load_weights(model, state, what="VideoReward", source=source, optional={optional},
                 explain=lambda _: "does model_config.json's peft_lora_config match the checkpoint?")


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedVideoReward:
    """What ``VideoReward`` is built from (its constructor's arguments)."""

    model: nn.Module  # peft-wrapped VideoRewardModel, frozen weights loaded, eval
    tokenizer: Any
    preprocess: VideoPreprocessConfig
    normalization: dict[str, tuple[float, float]]
    prompt_template: str


def _sections(cfg_path: Path) -> tuple[dict, dict, dict, dict]:
    try:
        full = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{cfg_path}' is not valid JSON: {err}") from None
    return tuple(full.get(k) or {} for k in ("data_config", "model_config", "peft_lora_config", "inference_config"))


def load_video_reward(folder: str | os.PathLike, *, prompt_template_file: str | os.PathLike | None,
                      step: int | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, fps: float | None = None, sample_all_frames: bool = False,
                      reference_pixel_range: bool = False, attn_implementation: str = "sdpa") -> LoadedVideoReward:
    """Read a VideoReward folder (layout in the module docstring).

    * ``prompt_template_file``: VideoAlign's ``prompt_template.py``; the template that
      ``data_config.prompt_template_type`` names is read from it. ``None``: our own wording, with a warning that
      the scores are then not VideoAlign's.
    * ``step``: which ``checkpoint-N`` (default: the largest N).
    * ``fps``: frames per second fed to the model (default: ``data_config.fps``); ``sample_all_frames`` and
      ``reference_pixel_range`` are the reference switches of ``VideoPreprocessConfig``.
    * dtype: bf16 on CUDA, fp32 on CPU unless given. Errors are FileNotFoundError / ValueError naming the file.
    """
    folder = Path(folder)
    cfg_path = folder / MODEL_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a VideoReward folder: '{cfg_path}' does not exist")
    data_cfg, model_cfg, peft_cfg, inference_cfg = _sections(cfg_path)
    if model_cfg.get("reward_token", "special") != "special" or not model_cfg.get("use_special_tokens", True):
        raise ValueError(f"'{cfg_path}': only reward_token 'special' with use_special_tokens is supported")
    if not peft_cfg.get("lora_enable", True):
        raise ValueError(f"'{cfg_path}': peft_lora_config.lora_enable is false; the released model uses LoRA")

    # Prompt first: a wrong template file fails before gigabytes of weights are read.
    if prompt_template_file is not None:
        template_type = data_cfg.get("prompt_template_type")
        if template_type is None:
            raise ValueError(f"'{cfg_path}' has no data_config.prompt_template_type to pick the training prompt")
        template = read_prompt_template(prompt_template_file, template_type)
    else:
        warnings.warn("VideoReward is prompted with this project's own wording because no VideoAlign "
                      "prompt_template.py was given: its scores are not VideoAlign's and its normalisation "
                      "statistics do not apply", stacklevel=3)
        template = DEFAULT_PROMPT_TEMPLATE

    ckpt_dir = select_checkpoint_dir(folder, step)
    weights, tok_dir = ckpt_dir / WEIGHTS, ckpt_dir / TOKENIZER_DIR
    for path in (weights, tok_dir):
        if not path.exists():
            raise FileNotFoundError(f"'{path}' does not exist; the VideoReward download is incomplete")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), padding_side="right")
    missing_tokens = [t for t in REWARD_TOKENS if t not in tokenizer.get_vocab()]
    if missing_tokens:
        raise ValueError(f"tokenizer '{tok_dir}' lacks the reward tokens {missing_tokens}")

    state = {to_current_layout(k): v for k, v in load_state_file(weights).items()}
    config = _base_config(str(model_cfg.get("model_name_or_path", QWEN2_VL_2B_NAME)), cfg_path)
    rows = _embedding_rows(state)
    if rows is not None:  # VideoAlign resized the embedding to the tokenizer (151936 -> 151660 rows for 2B)
        config.text_config.vocab_size = rows
    config._attn_implementation = attn_implementation
    device = torch.device(device)  # the caller resolves "auto" (build.resolve_device): models do not pick hardware
    with torch.device(device):
        net = VideoRewardModel(config, output_dim=int(model_cfg.get("output_dim", 3)))
    model = apply_lora(net.to(dtype), peft_cfg)
    _load_strict(model, state, weights)

    preprocess = VideoPreprocessConfig(
        fps=float(fps if fps is not None else data_cfg.get("fps", VideoPreprocessConfig.fps)),
        max_pixels=int(data_cfg.get("max_frame_pixels", VideoPreprocessConfig.max_pixels)),
        sample_all_frames=sample_all_frames, reference_pixel_range=reference_pixel_range)
    return LoadedVideoReward(model, tokenizer, preprocess, normalization_from_config(inference_cfg), template)
