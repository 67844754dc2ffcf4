"""The VideoReward network: Qwen2-VL-2B + a linear reward head read at three special tokens, with LoRA.

``VideoRewardModel`` subclasses ``Qwen2VLForConditionalGeneration`` (rather than wrapping it) so that, once peft
wraps it, its state-dict keys are exactly those of the released checkpoint (``base_model.model.model.
language_model....``, ``base_model.model.rm_head.weight``). ``apply_lora`` places peft LoRA where VideoAlign
placed it. ``normalization_from_config`` reads the per-dimension statistics that turn raw head outputs into the
normalised VQ/MQ/TA scores.

Two implementation choices that give the reference's numbers by a cheaper route:
* ``rm_head`` is applied to the three pooled hidden states instead of every position (the same numbers,
  without a ``[B, L, output_dim]`` tensor).
* Positions: the reference calls the language model with ``position_ids=None`` and ``input_ids=None``, which
  makes Qwen2-VL fall back to plain 1-D positions repeated on its three M-RoPE axes (no multimodal RoPE). We
  pass those positions explicitly, ``(attention_mask.cumsum(-1) - 1)`` on 3 axes, which is identical for
  right-padded batches and avoids transformers 5's ``mm_token_type_ids`` requirement.
"""
from __future__ import annotations

import ast
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from .prompt import EVAL_DIMS

__all__ = ["DEFAULT_NORMALIZATION", "VideoRewardModel", "find_lora_targets", "apply_lora",
           "normalization_from_config"]

# Normalisation used when a checkpoint's model_config.json has no ``inference_config``. These are
# THIRD-PARTY figures (a re-implementation auditing the released model_config.json), not read from
# the file here: check them against ``checkpoints/VideoReward/model_config.json`` when you have it.
DEFAULT_NORMALIZATION = {
    "VQ": (3.6757, 2.2476),
    "MQ": (1.1646, 1.3811),
    "TA": (2.8105, 2.5121),
}


def normalization_from_config(inference_cfg: Mapping[str, Any] | None) -> dict[str, tuple[float, float]]:
    """Per-dimension (mean, std) from a ``model_config.json`` ``inference_config`` section (``VQ_mean``,
    ``VQ_std``, ...), as VideoAlign reads it; dimensions it does not give keep ``DEFAULT_NORMALIZATION``."""
    out = dict(DEFAULT_NORMALIZATION)
    cfg = inference_cfg or {}
    for dim in EVAL_DIMS:
        mean, std = cfg.get(f"{dim}_mean"), cfg.get(f"{dim}_std")
        if (mean is None) != (std is None):
            raise ValueError(f"inference_config gives only one of {dim}_mean / {dim}_std")
        if mean is not None:
            if float(std) <= 0:
                raise ValueError(f"inference_config {dim}_std must be positive, got {std}")
            out[dim] = (float(mean), float(std))
    return out


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
