"""VideoReward (VideoAlign) as a frozen, batched, torchvision-free reward model.

Reward Forcing weights its Re-DMD loss by the *motion quality* (MQ) that VideoReward assigns to each
generated video. VideoReward is Qwen2-VL-2B-Instruct with LoRA on the language model, three added
special tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` in the prompt, and a linear
``rm_head`` read out at those three positions: (VQ, MQ, TA) = visual quality, motion quality, text
alignment. Spec: ``spec/reference.md`` section 5, quirks 9-10; ``spec/ecosystem.md`` section 6.

What lives here
---------------
* ``VideoRewardModel``: ``Qwen2VLForConditionalGeneration`` + ``rm_head``. A subclass rather than a
  wrapper so that, once peft wraps it, its state-dict keys are exactly the keys of the released
  checkpoint (``base_model.model.model.language_model....``, ``base_model.model.rm_head.weight``).
* ``apply_lora``: peft LoRA placed as VideoAlign placed it (every Linear/Embedding whose name contains
  none of the excluded substrings), so checkpoint keys line up.
* Preprocessing written with plain torch (no torchvision, no qwen-vl-utils, no transformers video
  processor -- those import torchvision): frame sampling, ``smart_resize``, pixel range, CLIP
  normalisation, temporal padding and the Qwen2-VL patch layout (tested equal to transformers'
  ``Qwen2VLImageProcessorPil``).
* ``VideoReward``: tokenizer + model + preprocessing + normalisation; ``score(videos, prompts)``;
  ``from_pretrained(folder)`` for the released checkpoint and ``tiny()`` for tests.

Differences from the reference (``reward_from_frames``), all switchable
-----------------------------------------------------------------------
* Pixel range: the reference multiplies decoded frames in [-1, 1] by 255 and lets the processor
  rescale by 1/255, so the network sees [-1, 1] where it was trained on [0, 1]. Default here: the
  correct ``(x + 1) / 2``; ``reference_pixel_range=True`` reproduces the reference.
* Frames: VideoAlign was trained on videos sampled at 2 fps; the reference feeds all 81 frames
  (padded to 82). Default here: 2-fps uniform sampling from the 16-fps source (81 -> 10 frames);
  ``sample_all_frames=True`` reproduces the reference.
* Batch: the reference scores only sample 0 and reuses it for the whole batch; ``score`` scores
  every sample.
* ``rm_head`` is applied to the three pooled hidden states instead of every position (the same
  numbers, without a ``[B, L, output_dim]`` tensor).
* Positions: the reference calls the language model with ``position_ids=None`` and
  ``input_ids=None``, which makes Qwen2-VL fall back to plain 1-D positions repeated on its three
  M-RoPE axes (no multimodal RoPE). We pass those positions explicitly,
  ``(attention_mask.cumsum(-1) - 1)`` on 3 axes, which is identical for right-padded batches and
  avoids transformers 5's ``mm_token_type_ids`` requirement.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from reward_forcing.checkpoints import download_hint, find_video_reward_dir, require_file

__all__ = [
    "REWARD_TOKENS", "EVAL_DIMS", "DEFAULT_NORMALIZATION", "DEFAULT_PROMPT_TEMPLATE", "CLIP_MEAN", "CLIP_STD",
    "VideoPreprocessConfig", "VideoRewardModel", "VideoReward",
    "smart_resize", "sample_frame_indices", "patchify_video", "preprocess_video", "build_prompt",
    "find_lora_targets", "apply_lora", "to_current_layout", "to_legacy_layout", "select_checkpoint_dir",
    "tiny_qwen2_vl_config", "TINY_PEFT_CONFIG",
]

# The three reward dimensions, in output order, and the special token read out for each.
EVAL_DIMS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")

# Qwen2-VL's special tokens used here.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END

# Qwen2-VL image/video processor constants (OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Normalisation used when a checkpoint's model_config.json has no ``inference_config``. These are
# THIRD-PARTY figures (a re-implementation auditing the released model_config.json), not read from
# the file here: check them against ``checkpoints/VideoReward/model_config.json`` when you have it.
DEFAULT_NORMALIZATION = {
    "VQ": (3.6757, 2.2476),
    "MQ": (1.1646, 1.3811),
    "TA": (2.8105, 2.5121),
}

# Our own wording of a "detailed_special" prompt: the user prompt plus one special token per reward
# dimension, placed right after the description of that dimension. The template VideoAlign trained
# with is a constant of its source code, not part of the checkpoint; the model reads its reward at the
# special tokens, but the surrounding words still condition those hidden states, so pass the exact
# training template (``prompt_template=`` or ``inference_config.prompt_template`` in
# model_config.json) when you need VideoAlign's exact numbers. ``{prompt}`` is replaced by the text.
DEFAULT_PROMPT_TEMPLATE = (
    "You are given a video generated by an AI model from the text prompt below. Judge it on three "
    "separate dimensions.\n"
    "Text prompt: {prompt}\n"
    "Visual quality (sharpness, detail, colour and the absence of artefacts in every frame): "
    "<|VQ_reward|>\n"
    "Motion quality (smoothness, physical plausibility and temporal consistency of the movement): "
    "<|MQ_reward|>\n"
    "Text alignment (how faithfully the video shows what the prompt asks for): <|TA_reward|>"
)

# Used when a tokenizer has no chat template: the Qwen2-VL chat format, video first, then the text.
_FALLBACK_CHAT = (
    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
    f"{IM_START}user\n{VIDEO_PLACEHOLDER}{{text}}{IM_END}\n"
    f"{IM_START}assistant\n"
)

# Chat template of the in-memory tiny tokenizer: the same format as _FALLBACK_CHAT, in Jinja.
_TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL-2B-Instruct's architecture (from its public config.json), used only when model.pth holds
# the full weights but no local copy of the base model folder exists: the weights then come from
# model.pth and the tokenizer from checkpoint-N/tokenizer, so only these numbers are needed. Every
# shape is checked by the strict state-dict load; rms_norm_eps and rope_theta are not.
_QWEN2_VL_2B_INSTRUCT = {
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
_QWEN2_VL_2B_NAMES = ("Qwen2-VL-2B-Instruct",)

_DOWNLOAD_HINT_TRAIN = download_hint(train=True)


# ==================================================================================================
# Preprocessing (plain torch)
# ==================================================================================================
@dataclass(frozen=True)
class VideoPreprocessConfig:
    """How a ``[T, 3, H, W]`` video in [-1, 1] becomes Qwen2-VL video patches.

    Defaults follow VideoAlign's training data path (qwen-vl-utils ``fetch_video`` at 2 fps, at most
    ``max_pixels`` per frame, pixel values in [0, 1] before CLIP normalisation). The two ``reference``
    switches reproduce Reward Forcing's ``reward_from_frames`` instead.
    """

    fps: float = 2.0  # frames per second fed to the model (VideoAlign data_config.fps)
    source_fps: float = 16.0  # frame rate of the input videos (Wan2.1: 16 fps)
    sample_all_frames: bool = False  # True: feed every frame, as the reference does
    min_frames: int = 4  # qwen-vl-utils FPS_MIN_FRAMES
    max_frames: int = 768  # qwen-vl-utils FPS_MAX_FRAMES
    max_pixels: int = 200704  # VideoAlign data_config.max_frame_pixels (256 * 28 * 28)
    min_pixels: int = 128 * 28 * 28  # qwen-vl-utils VIDEO_MIN_PIXELS; only matters below ~317x317
    reference_pixel_range: bool = False  # True: the reference's [-1, 1] instead of [0, 1]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (28 = patch 14 x merge 2)."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 200704) -> tuple[int, int]:
    """Qwen2-VL's target frame size: sides multiples of ``factor``, area within the pixel bounds.

    Each side is rounded to the nearest multiple of ``factor``; if the area then exceeds
    ``max_pixels`` both sides are scaled by the same factor and rounded *down*, if it falls below
    ``min_pixels`` they are scaled up and rounded *up*. 480x832 under 200704 gives 336x588.
    """
    if min(height, width) <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200, which Qwen2-VL does not accept")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def sample_frame_indices(num_frames: int, cfg: VideoPreprocessConfig = VideoPreprocessConfig()) -> torch.Tensor:
    """Indices of the frames fed to the model (uniform in time, like VideoAlign's training data).

    ``num_frames / source_fps * fps`` frames, clamped to ``[min_frames, min(max_frames, num_frames)]``
    and rounded down to a multiple of the temporal patch size, spread uniformly (rounded linspace) over
    the clip. 81 frames at 16 fps -> 10 frames at 2 fps. With ``sample_all_frames`` every index is
    returned (the reference); temporal padding to an even count happens in ``patchify_video``.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    k = cfg.temporal_patch_size
    if cfg.sample_all_frames or num_frames < k:
        return torch.arange(num_frames)
    lo = math.ceil(cfg.min_frames / k) * k
    hi = max(k, math.floor(min(cfg.max_frames, num_frames) / k) * k)
    n = num_frames / cfg.source_fps * cfg.fps
    n = min(max(n, lo), hi, num_frames)
    n = max(k, math.floor(n / k) * k)
    return torch.linspace(0, num_frames - 1, n).round().long()


def patchify_video(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut normalised frames ``[T, C, H, W]`` into Qwen2-VL's flat patch rows.

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Returns
    ``([grid_t * grid_h * grid_w, C * tps * patch * patch], (grid_t, grid_h, grid_w))``. Rows are
    ordered (t, h-block, w-block, h-in-block, w-in-block) so that each run of ``merge_size**2``
    consecutive rows is one 2x2 group that the vision tower's PatchMerger fuses into one token; each
    row is (channel, time, y, x) -- the layout of transformers' Qwen2-VL processors.
    """
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, C, H, W], got shape {tuple(frames.shape)}")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {unit}; resize with smart_resize first")
    if t % temporal_patch_size:
        pad = temporal_patch_size - t % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, c, h, w)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # (gt, tps, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tps, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def preprocess_video(video: torch.Tensor, cfg: VideoPreprocessConfig = VideoPreprocessConfig()
                     ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One video ``[T, 3, H, W]`` in [-1, 1] -> (patches ``[N, 1176]`` float32, grid ``(t, h, w)``).

    Steps: sample frames (``sample_frame_indices``); map to the pixel range (default [0, 1] =
    (x + 1) / 2; reference switch: [-1, 1]); resize every frame to ``smart_resize`` size with bicubic
    antialiased interpolation (what torchvision's tensor resize runs, which VideoAlign used); CLIP
    mean/std normalisation; ``patchify_video``.
    """
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video [T, 3, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    frames = video[sample_frame_indices(video.shape[0], cfg).to(video.device)]
    frames = frames.detach().float().clamp(-1.0, 1.0)
    if not cfg.reference_pixel_range:
        frames = (frames + 1.0) * 0.5
    h, w = frames.shape[-2:]
    th, tw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (th, tw) != (h, w):
        frames = F.interpolate(frames, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
        if not cfg.reference_pixel_range:
            # VideoAlign resized uint8 frames (rounded and clamped); keep the overshoot of bicubic out.
            frames = frames.clamp(0.0, 1.0)
    mean = torch.tensor(cfg.image_mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    frames = (frames - mean) / std
    return patchify_video(frames, cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size)


def build_prompt(prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The text part of the user message: ``template`` with ``{prompt}`` replaced (no str.format, so
    braces in user prompts are safe)."""
    return template.replace("{prompt}", prompt)


def _check_template(template: str) -> None:
    missing = [t for t in ("{prompt}", *REWARD_TOKENS) if t not in template]
    if missing:
        raise ValueError(f"prompt template lacks {missing}; it must contain '{{prompt}}' and each of {REWARD_TOKENS}")
    for tok in REWARD_TOKENS:
        if template.count(tok) != 1:
            raise ValueError(f"prompt template must contain {tok} exactly once")


# ==================================================================================================
# Model
# ==================================================================================================
class VideoRewardModel(Qwen2VLForConditionalGeneration):
    """Qwen2-VL with ``rm_head = Linear(hidden, output_dim, bias=False)`` read at the reward tokens.

    ``forward`` returns ``[B, 3]`` rewards (VQ, MQ, TA). With ``output_dim == 3`` the head's j-th
    output at the j-th token is used (the diagonal); with ``output_dim == 1`` its single output.
    ``reward_token_ids`` (VQ, MQ, TA token ids) must be set before calling ``forward``; the reward of
    dimension j is read at the position of token j, so the order of the tokens in the prompt does not
    matter. ``lm_head`` is kept (it is in the checkpoint) but never used.
    """

    def __init__(self, config: Qwen2VLConfig, output_dim: int = 3):
        super().__init__(config)
        if output_dim not in (1, 3):
            raise ValueError(f"output_dim must be 1 or 3, got {output_dim}")
        self.output_dim = output_dim
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        nn.init.normal_(self.rm_head.weight, std=config.text_config.initializer_range)
        self.reward_token_ids: tuple[int, int, int] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                video_grid_thw: torch.Tensor) -> torch.Tensor:
        """input_ids/attention_mask ``[B, L]`` (right padded), pixel_values_videos ``[sum N_i, 1176]``,
        video_grid_thw ``[B, 3]`` -> rewards ``[B, 3]`` (VQ, MQ, TA), unnormalised."""
        if self.reward_token_ids is None:
            raise RuntimeError("VideoRewardModel.reward_token_ids is not set (ids of the VQ, MQ, TA tokens)")
        qwen = self.model  # Qwen2VLModel: .visual + .language_model
        embeds = qwen.get_input_embeddings()(input_ids)

        # Vision tower -> one merged token per 2x2 patch group; scatter them over <|video_pad|>, in
        # batch order (video i fills the placeholders of row i).
        video = qwen.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output
        video = torch.cat(list(video), dim=0).to(embeds.device, embeds.dtype)
        slots = input_ids == self.config.video_token_id
        if int(slots.sum()) != video.shape[0]:
            raise ValueError(f"{int(slots.sum())} video placeholder tokens but {video.shape[0]} visual tokens")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), video)

        # Plain 1-D positions on all three M-RoPE axes (what the reference effectively used).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        positions = positions.unsqueeze(0).expand(3, -1, -1)
        hidden = qwen.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                     use_cache=False).last_hidden_state

        # Pool at the three reward tokens, then apply the head: [B, 3, hidden] -> [B, 3, output_dim].
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = []
        for tok in self.reward_token_ids:
            hit = input_ids == tok
            if not bool((hit.sum(-1) == 1).all()):
                raise ValueError(f"every sample must contain reward token id {tok} exactly once")
            pooled.append(hidden[rows, hit.float().argmax(-1)])
        logits = self.rm_head(torch.stack(pooled, dim=1))
        if self.output_dim == 3:
            return logits.diagonal(dim1=1, dim2=2)
        return logits.squeeze(-1)


def find_lora_targets(model: nn.Module, exclude: Sequence[str], num_lora_modules: int = -1) -> list[str]:
    """Full names of every ``nn.Linear`` / ``nn.Embedding`` whose name contains no ``exclude`` entry.

    This is how VideoAlign chose its LoRA modules (with ``visual`` added to ``exclude`` unless
    ``vision_lora``); ``num_lora_modules > 0`` keeps only the last that many, as its option did.
    """
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Embedding)) and not any(ex in name for ex in exclude)]
    if num_lora_modules is not None and num_lora_modules > 0:
        names = names[-num_lora_modules:]
    return names


def _exclude_list(peft_cfg: Mapping[str, Any]) -> list[str]:
    exclude = peft_cfg.get("lora_namespan_exclude", ["lm_head", "rm_head", "embed_tokens"])
    if isinstance(exclude, str):  # VideoAlign's CLI stored it as a Python literal string
        exclude = ast.literal_eval(exclude)
    exclude = list(exclude or [])
    if not peft_cfg.get("vision_lora", False) and "visual" not in exclude:
        exclude.append("visual")
    return exclude


def apply_lora(model: VideoRewardModel, peft_cfg: Mapping[str, Any]) -> nn.Module:
    """Wrap ``model`` with peft LoRA as described by a ``peft_lora_config`` section; returns it in eval.

    Keys used: ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_namespan_exclude``, ``vision_lora``,
    ``num_lora_modules``, ``use_rslora``. ``get_peft_model`` puts the model back into training mode
    (LoRA dropout active), so ``.eval()`` is called after wrapping.
    """
    from peft import LoraConfig, get_peft_model

    targets = find_lora_targets(model, _exclude_list(peft_cfg), int(peft_cfg.get("num_lora_modules", -1)))
    if not targets:
        raise ValueError("LoRA config selects no module; check lora_namespan_exclude")
    config = LoraConfig(
        r=int(peft_cfg.get("lora_r", 64)),
        lora_alpha=int(peft_cfg.get("lora_alpha", 128)),
        lora_dropout=float(peft_cfg.get("lora_dropout", 0.05)),
        use_rslora=bool(peft_cfg.get("use_rslora", False)),
        target_modules=targets,
        bias="none",
    )
    with warnings.catch_warnings():  # peft calls a deprecated transformers helper
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    return wrapped.eval()


# ==================================================================================================
# Checkpoint layouts
# ==================================================================================================
_PEFT = "base_model.model."


def to_current_layout(key: str) -> str:
    """Rename a PEFT-wrapped Qwen2-VL key from the transformers 4.45 layout to the >= 4.52 one.

    4.45: ``base_model.model.model.layers.0...`` (language model directly under ``model``) and
    ``base_model.model.visual...``. Now: ``base_model.model.model.language_model.layers.0...`` and
    ``base_model.model.model.visual...``. Keys already in the new layout, ``lm_head`` and ``rm_head``
    are returned unchanged.
    """
    if key.startswith(_PEFT + "visual."):
        return _PEFT + "model." + key[len(_PEFT):]
    inner = _PEFT + "model."
    if key.startswith(inner):
        rest = key[len(inner):]
        if not rest.startswith(("language_model.", "visual.")):
            return inner + "language_model." + rest
    return key


def to_legacy_layout(key: str) -> str:
    """Inverse of ``to_current_layout`` (writes files that transformers 4.45-era VideoAlign reads)."""
    if key.startswith(_PEFT + "model.visual."):
        return _PEFT + key[len(_PEFT + "model."):]
    if key.startswith(_PEFT + "model.language_model."):
        return _PEFT + "model." + key[len(_PEFT + "model.language_model."):]
    return key


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def select_checkpoint_dir(folder: str | os.PathLike, step: int | None = None) -> Path:
    """``folder/checkpoint-<step>``, or the one with the largest step when ``step`` is None or < 0."""
    folder = Path(folder)
    found = {}
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no checkpoint-<N> folder in '{folder}'; {_DOWNLOAD_HINT_TRAIN}.")
    if step is None or step < 0:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"'{folder / f'checkpoint-{step}'}' does not exist; available steps: {sorted(found)}")
    return found[step]


def _resolve_base_model(folder: Path, name: str) -> Path | None:
    """Local folder of ``model_name_or_path``: as given (absolute or relative to the working
    directory), or next to model_config.json / one level up, under its full or last-component name."""
    candidates = [Path(name).expanduser()]
    for root in (folder, folder.parent):
        candidates += [root / name, root / Path(name).name]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    return None


# ==================================================================================================
# Tokenizer helpers
# ==================================================================================================
def _build_tiny_tokenizer():
    """Byte-level BPE with no merges (one token per byte) plus Qwen's special tokens, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD,
               *REWARD_TOKENS]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token="<|endoftext|>",
                                  additional_special_tokens=special)
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.chat_template = _TINY_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or (isinstance(tid, int) and tid < 0):
        raise ValueError(f"tokenizer has no token {token!r}")
    return int(tid)


def _normalization_from(inference_cfg: Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    """Per-dimension (mean, std) from an ``inference_config`` section.

    Accepts VideoAlign's flat form (``VQ_mean``, ``VQ_std``, ...) and a nested one
    (``{"VQ": {"mean": .., "std": ..}}``); anything absent falls back to ``DEFAULT_NORMALIZATION``.
    """
    out = dict(DEFAULT_NORMALIZATION)
    cfg = inference_cfg or {}
    for dim in EVAL_DIMS:
        nested = cfg.get(dim) if isinstance(cfg.get(dim), Mapping) else {}
        mean = cfg.get(f"{dim}_mean", nested.get("mean"))
        std = cfg.get(f"{dim}_std", nested.get("std"))
        if (mean is None) != (std is None):
            raise ValueError(f"inference_config gives only one of {dim} mean/std")
        if mean is not None:
            out[dim] = (float(mean), float(std))
    return out


# ==================================================================================================
# The scorer
# ==================================================================================================
class VideoReward(nn.Module):
    """Frozen VideoReward scorer: ``score(videos, prompts) -> {"VQ", "MQ", "TA": [B], "raw": [B, 3]}``.

    ``model`` is a ``VideoRewardModel``, usually wrapped by peft (its ``state_dict`` then has the
    released checkpoint's keys under ``model.``). Every parameter is frozen and the module stays in
    eval mode even if a parent calls ``.train()`` (LoRA dropout must never switch on). Build with
    ``from_pretrained`` (released checkpoint) or ``tiny`` (random, in memory, for tests).
    """

    def __init__(self, model: nn.Module, tokenizer, *, preprocess: VideoPreprocessConfig = VideoPreprocessConfig(),
                 normalization: Mapping[str, tuple[float, float]] | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE):
        super().__init__()
        _check_template(prompt_template)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.prompt_template = prompt_template
        norm = dict(DEFAULT_NORMALIZATION, **(normalization or {}))
        self.register_buffer("norm_mean", torch.tensor([norm[d][0] for d in EVAL_DIMS]), persistent=False)
        self.register_buffer("norm_std", torch.tensor([norm[d][1] for d in EVAL_DIMS]), persistent=False)

        net = self.network
        net.reward_token_ids = tuple(_token_id(tokenizer, t) for t in REWARD_TOKENS)
        self.video_token_id = net.config.video_token_id
        if _token_id(tokenizer, VIDEO_PAD) != self.video_token_id:
            raise ValueError(f"tokenizer's {VIDEO_PAD} id differs from the model's video_token_id "
                             f"{self.video_token_id}")
        vis = net.config.vision_config
        if (vis.patch_size, vis.temporal_patch_size, vis.spatial_merge_size) != (
                preprocess.patch_size, preprocess.temporal_patch_size, preprocess.merge_size):
            raise ValueError("preprocessing patch sizes differ from the vision tower's")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else _token_id(tokenizer, "<|endoftext|>")
        self.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- module plumbing
    @property
    def network(self) -> VideoRewardModel:
        """The ``VideoRewardModel`` inside (LoRA layers injected in place when peft-wrapped)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def device(self) -> torch.device:
        return self.norm_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.rm_head.weight.dtype

    def train(self, mode: bool = True) -> VideoReward:
        """Always eval: the reward model is frozen (and LoRA dropout must stay off)."""
        return super().train(False)

    # ---------------------------------------------------------------- inputs
    def build_text(self, prompt: str) -> str:
        """The chat text for one prompt with a single video placeholder, ending with the generation
        prompt. Uses the tokenizer's chat template (video item first, then the text); without one, or
        if the template does not render exactly one video placeholder, the Qwen2-VL chat format
        (``_FALLBACK_CHAT``) is written directly."""
        text = build_prompt(prompt, self.prompt_template)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
            try:
                rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except ImportError:  # chat templates need jinja2, which transformers does not require
                rendered = None
            if rendered is not None and rendered.count(VIDEO_PLACEHOLDER) == 1:
                return rendered
            warnings.warn("could not render the tokenizer's chat template with one video placeholder (is jinja2 "
                          "installed?); using the built-in Qwen2-VL chat format", stacklevel=2)
        return _FALLBACK_CHAT.replace("{text}", text)

    def prepare_inputs(self, videos: torch.Tensor | Sequence[torch.Tensor], prompts: str | Sequence[str]
                       ) -> dict[str, torch.Tensor]:
        """Videos (``[B, T, 3, H, W]`` or a list of ``[T, 3, H, W]``, in [-1, 1]) and prompts -> model
        inputs on the CPU-or-input device: ``input_ids``/``attention_mask`` ``[B, L]`` (right padded),
        ``pixel_values_videos`` ``[sum N_i, 1176]`` float32, ``video_grid_thw`` ``[B, 3]``.

        The single ``<|video_pad|>`` of each chat text is expanded to ``t * h * w / merge**2`` copies
        (one per merged visual token), as the Qwen2-VL processor does.
        """
        videos = list(videos)
        prompts = [prompts] * len(videos) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        merge = self.preprocess.merge_size ** 2
        patches, grids, ids = [], [], []
        for video, prompt in zip(videos, prompts):
            p, grid = preprocess_video(video, self.preprocess)
            patches.append(p)
            grids.append(grid)
            row = self.tokenizer(self.build_text(prompt), add_special_tokens=False)["input_ids"]
            at = [i for i, t in enumerate(row) if t == self.video_token_id]
            if len(at) != 1:
                raise ValueError(f"chat text has {len(at)} video placeholders, expected 1")
            n = grid[0] * grid[1] * grid[2] // merge
            ids.append(row[:at[0]] + [self.video_token_id] * n + row[at[0] + 1:])
        length = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, :len(r)] = torch.tensor(r)
            attention_mask[i, :len(r)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values_videos": torch.cat(patches, dim=0),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def raw_scores(self, videos: torch.Tensor | Sequence[torch.Tensor], prompts: str | Sequence[str]) -> torch.Tensor:
        """Unnormalised ``[B, 3]`` (VQ, MQ, TA), float32 on the model's device."""
        inputs = {k: v.to(self.device) for k, v in self.prepare_inputs(videos, prompts).items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        return self.network(**inputs).float()

    @torch.no_grad()
    def score(self, videos: torch.Tensor | Sequence[torch.Tensor], prompts: str | Sequence[str],
              max_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Score every sample: ``{"VQ", "MQ", "TA": [B], "raw": [B, 3]}``, float32 on the input device.

        ``videos``: ``[B, T, 3, H, W]`` (or a list of ``[T, 3, H, W]``) in [-1, 1]; ``prompts``: one
        string per video (or one for all). ``VQ/MQ/TA`` are ``(raw - mean) / std`` with the
        checkpoint's ``inference_config`` statistics. ``max_batch_size`` bounds how many videos go
        through the model at once (memory); results do not depend on it beyond float rounding.
        """
        videos = list(videos)
        if not videos:
            raise ValueError("score() needs at least one video")
        out_device = videos[0].device
        prompts = [prompts] * len(videos) if isinstance(prompts, str) else list(prompts)
        step = max_batch_size or max(1, len(videos))
        raw = torch.cat([self.raw_scores(videos[i:i + step], prompts[i:i + step])
                         for i in range(0, len(videos), step)], dim=0)
        normalised = (raw - self.norm_mean) / self.norm_std
        result = {dim: normalised[:, j].to(out_device) for j, dim in enumerate(EVAL_DIMS)}
        result["raw"] = raw.to(out_device)
        return result

    forward = score

    # ---------------------------------------------------------------- construction
    @classmethod
    def tiny(cls, seed: int = 0, *, lora: bool = False, output_dim: int = 3,
             preprocess: VideoPreprocessConfig | None = None, **kwargs) -> VideoReward:
        """A random Qwen2-VL of a few hundred thousand parameters plus a byte-level tokenizer, built in
        memory (never touches the hub). ``lora=True`` wraps it with a small LoRA (r 4) like the real
        model. Small frames work: ``min_pixels`` is 56*56 here."""
        tokenizer = _build_tiny_tokenizer()
        config = tiny_qwen2_vl_config(tokenizer)
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(seed)
            model = VideoRewardModel(config, output_dim=output_dim).eval()
            if lora:
                model = apply_lora(model, TINY_PEFT_CONFIG)
        preprocess = preprocess or VideoPreprocessConfig(min_pixels=56 * 56)
        return cls(model, tokenizer, preprocess=preprocess, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, step: int | None = None, *,
                        sample_all_frames: bool = False, reference_pixel_range: bool = False,
                        prompt_template: str | None = None, attn_implementation: str = "sdpa") -> VideoReward:
        """Load a VideoReward folder (``checkpoints/VideoReward``: ``model_config.json`` + ``checkpoint-N/``).

        * ``folder`` may also be the checkpoint root that contains ``VideoReward`` (or ``Videoreward``).
        * ``checkpoint-N``: the largest N, or ``step``.
        * Weights, either layout:
          - ``model.pth``: the full PEFT-wrapped state dict, keys in the transformers 4.45 layout
            (``base_model.model.model.layers...``, ``base_model.model.visual...``) or the new one
            (``...model.language_model...``, ``...model.visual...``); loaded strictly. Only the base
            model's *config* is needed (a local copy of ``model_name_or_path``, else Qwen2-VL-2B's
            built-in architecture).
          - ``adapter_model.safetensors`` (LoRA) + ``non_lora_state_dict.pth`` (rm_head etc.) on top
            of the base weights, which then must be available locally (``model_name_or_path`` as an
            absolute path or a folder next to model_config.json). Nothing is downloaded.
        * Tokenizer: ``checkpoint-N/tokenizer/`` if present, else the base model folder (the reward
          tokens are added if missing, as VideoAlign did).
        * Normalisation from ``inference_config`` (defaults: ``DEFAULT_NORMALIZATION``); prompt template
          from ``prompt_template=`` or ``inference_config.prompt_template`` (else ours).
        * dtype: bf16 on CUDA, fp32 on CPU unless given. Frozen, eval.
        """
        from transformers import AutoTokenizer

        folder = Path(folder).expanduser()
        if folder.is_dir() and not (folder / "model_config.json").is_file():
            try:  # the checkpoint root that holds VideoReward/ (or Videoreward/)
                folder = find_video_reward_dir(folder)
            except FileNotFoundError:
                pass
        require_file(folder, "VideoReward reward model folder", train=True)
        cfg_path = require_file(folder / "model_config.json", "VideoReward model_config.json", train=True)
        full_cfg = json.loads(cfg_path.read_text())
        data_cfg = full_cfg.get("data_config", {}) or {}
        model_cfg = full_cfg.get("model_config", {}) or {}
        peft_cfg = full_cfg.get("peft_lora_config", {}) or {}
        inference_cfg = full_cfg.get("inference_config", {}) or {}
        ckpt_dir = select_checkpoint_dir(folder, step)

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        output_dim = int(model_cfg.get("output_dim", 3))
        if model_cfg.get("reward_token", "special") != "special":
            raise ValueError(f"reward_token={model_cfg.get('reward_token')!r} is not supported (only 'special')")
        name = str(model_cfg.get("model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct"))
        base_dir = _resolve_base_model(folder, name)

        # Weights
        full_path = ckpt_dir / "model.pth"
        adapter_path = ckpt_dir / "adapter_model.safetensors"
        non_lora_path = ckpt_dir / "non_lora_state_dict.pth"
        if full_path.is_file():
            state = {to_current_layout(k): v for k, v in _load_torch(full_path).items()}
        elif adapter_path.is_file() and non_lora_path.is_file():
            state = None
        else:
            raise FileNotFoundError(
                f"'{ckpt_dir}' has neither 'model.pth' nor 'adapter_model.safetensors' + "
                f"'non_lora_state_dict.pth'; the download is incomplete -- {_DOWNLOAD_HINT_TRAIN}.")

        # Tokenizer
        tok_dir = ckpt_dir / "tokenizer" if (ckpt_dir / "tokenizer").is_dir() else base_dir
        if tok_dir is None:
            raise FileNotFoundError(
                f"no tokenizer: neither '{ckpt_dir / 'tokenizer'}' nor a local copy of '{name}' (looked for "
                f"'{name}' as a path and under '{folder}' and '{folder.parent}'); {_DOWNLOAD_HINT_TRAIN}.")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), padding_side="right")
        missing_tokens = [t for t in REWARD_TOKENS if t not in tokenizer.get_vocab()]
        if missing_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(missing_tokens)})

        # Network
        grew = False
        if state is not None:
            if base_dir is not None:
                config = Qwen2VLConfig.from_pretrained(str(base_dir))
            elif Path(name).name in _QWEN2_VL_2B_NAMES:
                config = Qwen2VLConfig(**json.loads(json.dumps(_QWEN2_VL_2B_INSTRUCT)))
            else:
                raise FileNotFoundError(
                    f"base model '{name}' of '{cfg_path}' not found locally (looked for '{name}' as a path and "
                    f"under '{folder}' and '{folder.parent}'); put its folder there.")
            vocab = _embedding_rows(state)
            if vocab is not None:
                config.text_config.vocab_size = vocab
            config._attn_implementation = attn_implementation
            with torch.device(device):
                net = VideoRewardModel(config, output_dim=output_dim)
        else:
            if base_dir is None:
                raise FileNotFoundError(
                    f"'{ckpt_dir}' holds LoRA adapters, which need the base model '{name}' locally (looked "
                    f"for '{name}' as a path and under '{folder}' and '{folder.parent}'); put its folder there.")
            net = VideoRewardModel.from_pretrained(str(base_dir), output_dim=output_dim,
                                                   attn_implementation=attn_implementation)
            net.to(device)
            rows = net.get_input_embeddings().num_embeddings
            if model_cfg.get("use_special_tokens", True) and rows != len(tokenizer):
                # As VideoAlign did. For Qwen2-VL-2B this *shrinks* 151936 -> 151660 rows, so the reward
                # tokens keep rows of the base model; only a growing vocabulary gets fresh rows.
                net.resize_token_embeddings(len(tokenizer))
                grew = len(tokenizer) > rows
        net.to(dtype)
        model = apply_lora(net, peft_cfg) if peft_cfg.get("lora_enable", True) else net.eval()

        if state is not None:
            if not hasattr(model, "get_base_model"):  # no LoRA: drop PEFT-style prefixes the file may carry
                state = {k[len(_PEFT):] if k.startswith(_PEFT) else k: v for k, v in state.items()}
            _load_strict(model, state, full_path)
        else:
            _load_adapter(model, adapter_path, non_lora_path, new_token_rows=grew)

        preprocess = VideoPreprocessConfig(
            fps=float(data_cfg.get("fps", 2.0)),
            max_pixels=int(data_cfg.get("max_frame_pixels", data_cfg.get("max_pixels", 200704))),
            min_pixels=int(data_cfg.get("min_pixels", VideoPreprocessConfig.min_pixels)),
            sample_all_frames=sample_all_frames, reference_pixel_range=reference_pixel_range)
        template = prompt_template or inference_cfg.get("prompt_template") or data_cfg.get("prompt_template") \
            or DEFAULT_PROMPT_TEMPLATE
        reward = cls(model, tokenizer, preprocess=preprocess, normalization=_normalization_from(inference_cfg),
                     prompt_template=template)
        return reward.to(device)


def _embedding_rows(state: Mapping[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if key.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight")):
            return int(value.shape[0])
    return None


def _drop_tied_lm_head(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> set[str]:
    """Handle ``lm_head.weight``, which scoring never uses. Returns the keys that may be absent.

    When the model ties lm_head to the input embedding (Qwen2-VL-2B does), loading both keys would
    write lm_head's copy *into the embedding* (same storage, loaded last). The file's copy is dropped
    so that the embedding comes from ``embed_tokens.weight``; a warning says so if the two differ.
    """
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = _PEFT if hasattr(model, "get_base_model") else ""
    head, embed = prefix + "lm_head.weight", None
    for key in state:
        if key.endswith("embed_tokens.weight") or key.endswith("embed_tokens.base_layer.weight"):
            embed = key
    tied = net.lm_head.weight is net.get_input_embeddings().weight
    if tied and head in state:
        if embed is not None and not torch.equal(state[head], state[embed]):
            warnings.warn(f"'{source}': lm_head.weight differs from embed_tokens.weight but the model ties them; "
                          f"keeping embed_tokens (lm_head is not used for rewards)", stacklevel=3)
        del state[head]
    return {head}


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Load a full state dict; every key must match (``lm_head.weight`` may be absent: it is unused)."""
    state = dict(state)
    optional = _drop_tied_lm_head(model, state, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise RuntimeError(
            f"cannot load VideoReward weights from '{source}': {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} wrong shapes (e.g. {shapes[:3]}). "
            f"Does model_config.json's peft_lora_config match the checkpoint?")
    model.load_state_dict(state, strict=False)


def _load_adapter(model: nn.Module, adapter_path: Path, non_lora_path: Path, new_token_rows: bool = False) -> None:
    """LoRA weights (peft ``save_pretrained`` names, no adapter name) + the other trained weights.

    ``non_lora_state_dict.pth`` holds whatever VideoAlign saved besides the adapters (at least
    ``rm_head``; with its defaults every non-LoRA parameter) in either key layout.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not hasattr(model, "get_base_model"):
        raise ValueError(f"'{adapter_path}' holds LoRA adapters but peft_lora_config.lora_enable is false")
    adapter = {to_current_layout(k): v for k, v in load_file(str(adapter_path)).items()}
    result = set_peft_model_state_dict(model, adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"'{adapter_path}': {len(result.unexpected_keys)} keys match no LoRA module, e.g. "
                           f"{sorted(result.unexpected_keys)[:3]}")
    lora_keys = {k for k in model.state_dict() if ".lora_" in k}
    loaded = set(lora_keys) - set(result.missing_keys)
    if not loaded or len(loaded) != len(lora_keys):
        raise RuntimeError(f"'{adapter_path}' covers {len(loaded)} of {len(lora_keys)} LoRA weights")

    non_lora = {to_current_layout(k): v for k, v in _load_torch(non_lora_path).items()}
    _drop_tied_lm_head(model, non_lora, non_lora_path)
    expected = model.state_dict()
    unexpected = sorted(set(non_lora) - set(expected))
    if unexpected:
        raise RuntimeError(f"'{non_lora_path}': {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    head = _PEFT + "rm_head.weight"
    if head not in non_lora:
        raise RuntimeError(f"'{non_lora_path}' lacks '{head}'; the reward head would stay random")
    if new_token_rows and not any(k.endswith("embed_tokens.weight") for k in non_lora):
        warnings.warn(f"'{non_lora_path}' has no embed_tokens.weight, so the embeddings of the added reward tokens "
                      f"are freshly initialised, not the trained ones", stacklevel=3)
    model.load_state_dict(non_lora, strict=False)


# ==================================================================================================
# Tiny flavour
# ==================================================================================================
TINY_PEFT_CONFIG = {
    "lora_enable": True, "vision_lora": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
    "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens"], "num_lora_modules": -1,
}


def tiny_qwen2_vl_config(tokenizer, tie_word_embeddings: bool = False) -> Qwen2VLConfig:
    """A Qwen2-VL config small enough for CPU tests, consistent with ``tokenizer``'s special ids:
    vision depth 1, width 32, 2 heads, patch 14 / temporal 2 / merge 2; text width 64, 2 layers,
    4 heads (2 kv heads), vocabulary = the tokenizer."""
    ids = {t: _token_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, IM_END)}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "eos_token_id": ids[IM_END], "bos_token_id": None,
            "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "in_channels": 3,
            "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
        },
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = "sdpa"
    return config
