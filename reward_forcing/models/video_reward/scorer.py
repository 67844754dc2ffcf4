"""``VideoReward``: the frozen scorer the trainer and evaluation call. Tokenizer + preprocessing + network +
normalisation behind one method::

    reward = VideoReward.from_pretrained("checkpoints/VideoReward",
                                         prompt_template_file="checkpoints/VideoReward/prompt_template.py")
    scores = reward.score(videos, prompts)   # {"VQ", "MQ", "TA": [B], "raw": [B, 3]}
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .loading import load_video_reward
from .model import DEFAULT_NORMALIZATION, VideoRewardModel, apply_lora
from .preprocess import VideoPreprocessConfig, preprocess_video
from .prompt import (
    DEFAULT_PROMPT_TEMPLATE, EVAL_DIMS, REWARD_TOKENS, VIDEO_PAD, chat_text, check_prompt_template, fill_prompt,
    token_id,
)
from .tiny import TINY_PEFT_CONFIG, build_tiny_tokenizer, tiny_qwen2_vl_config

__all__ = ["VideoReward"]

Videos = torch.Tensor | Sequence[torch.Tensor]


class VideoReward(nn.Module):
    """Frozen VideoReward scorer: ``score(videos, prompts) -> {"VQ", "MQ", "TA": [B], "raw": [B, 3]}``.

    ``model`` is a ``VideoRewardModel``, usually wrapped by peft (its ``state_dict`` then has the released
    checkpoint's keys under ``model.``). Every parameter is frozen and the module stays in eval mode even if a
    parent calls ``.train()`` (LoRA dropout must never switch on). Build with ``from_pretrained`` (released
    checkpoint) or ``tiny`` (random, in memory, for tests and debug runs).
    """

    def __init__(self, model: nn.Module, tokenizer, *, preprocess: VideoPreprocessConfig = VideoPreprocessConfig(),
                 normalization: Mapping[str, tuple[float, float]] | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE):
        super().__init__()
        check_prompt_template(prompt_template)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.prompt_template = prompt_template
        # Plain floats, not buffers: a cast of the module to bf16 must not round the statistics.
        norm = dict(DEFAULT_NORMALIZATION, **(normalization or {}))
        self.normalization = {d: (float(norm[d][0]), float(norm[d][1])) for d in EVAL_DIMS}

        net = self.network
        net.reward_token_ids = tuple(token_id(tokenizer, t) for t in REWARD_TOKENS)
        self.video_token_id = net.config.video_token_id
        if token_id(tokenizer, VIDEO_PAD) != self.video_token_id:
            raise ValueError(f"tokenizer's {VIDEO_PAD} id differs from the model's video_token_id "
                             f"{self.video_token_id}")
        vis = net.config.vision_config
        if (vis.patch_size, vis.temporal_patch_size, vis.spatial_merge_size) != (
                preprocess.patch_size, preprocess.temporal_patch_size, preprocess.merge_size):
            raise ValueError("preprocessing patch sizes differ from the vision tower's")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else token_id(tokenizer, "<|endoftext|>")
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
        return self.network.rm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.rm_head.weight.dtype

    def train(self, mode: bool = True) -> VideoReward:
        """Always eval: the reward model is frozen (and LoRA dropout must stay off)."""
        return super().train(False)

    # ---------------------------------------------------------------- inputs
    def build_text(self, prompt: str) -> str:
        """The chat text for one prompt: the filled template after one video placeholder, then the generation
        prompt (see ``prompt.chat_text``)."""
        return chat_text(self.tokenizer, fill_prompt(self.prompt_template, prompt))

    def prepare_inputs(self, videos: Videos, prompts: str | Sequence[str],
                       preprocess: VideoPreprocessConfig | None = None) -> dict[str, torch.Tensor]:
        """Videos and prompts -> model inputs: ``input_ids``/``attention_mask`` ``[B, L]`` (right
        padded) and ``video_grid_thw`` ``[B, 3]`` on the CPU, ``pixel_values_videos`` ``[sum N_i, 1176]`` float32 on
        the videos' device.

        The single ``<|video_pad|>`` of each chat text is expanded to ``t * h * w / merge**2`` copies (one per
        merged visual token), as the Qwen2-VL processor does.
        """
        preprocess = preprocess or self.preprocess
        videos = list(videos)
        prompts = [prompts] * len(videos) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        merge = preprocess.merge_size ** 2
        patches, grids, ids = [], [], []
        for video, prompt in zip(videos, prompts):
            p, grid = preprocess_video(video, preprocess)
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
    def raw_scores(self, videos: Videos, prompts: str | Sequence[str],
                   preprocess: VideoPreprocessConfig | None = None) -> torch.Tensor:
        """Unnormalised ``[B, 3]`` (VQ, MQ, TA), float32 on the model's device."""
        inputs = {k: v.to(self.device) for k, v in self.prepare_inputs(videos, prompts, preprocess).items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        return self.network(**inputs).float()

    @torch.no_grad()
    def score(self, videos: Videos, prompts: str | Sequence[str], *, max_batch_size: int | None = None,
              source_fps: float | None = None) -> dict[str, torch.Tensor]:
        """Score every sample: ``{"VQ", "MQ", "TA": [B], "raw": [B, 3]}``, float32 on the input device.

        ``videos``: float ``[B, T, 3, H, W]`` in [-1, 1] (decoded pixels) or uint8 ``[B, T, H, W, 3]`` (frames of
        a file), or a list of per-video tensors in either form (lengths and sizes may differ). ``prompts``: one
        string per video, or one for all. ``VQ/MQ/TA`` are ``(raw - mean) / std`` with the checkpoint's
        ``inference_config`` statistics. ``source_fps``: frame rate of these videos when it is not
        ``preprocess.source_fps`` (16, Wan's). ``max_batch_size`` bounds how many videos go through the model at
        once (memory); results do not depend on it beyond float rounding. No gradients flow.
        """
        videos = list(videos)
        if not videos:
            raise ValueError("score() needs at least one video")
        out_device = videos[0].device
        prompts = [prompts] * len(videos) if isinstance(prompts, str) else list(prompts)
        preprocess = self.preprocess
        if source_fps is not None:
            if source_fps <= 0:
                raise ValueError(f"source_fps must be positive, got {source_fps}")
            preprocess = dataclasses.replace(preprocess, source_fps=float(source_fps))
        step = max_batch_size or len(videos)
        raw = torch.cat([self.raw_scores(videos[i:i + step], prompts[i:i + step], preprocess)
                         for i in range(0, len(videos), step)], dim=0)
        mean, std = (torch.tensor([self.normalization[d][i] for d in EVAL_DIMS], device=raw.device) for i in (0, 1))
        normalised = (raw - mean) / std
        result = {dim: normalised[:, j].to(out_device) for j, dim in enumerate(EVAL_DIMS)}
        result["raw"] = raw.to(out_device)
        return result

    forward = score

    # ---------------------------------------------------------------- construction
    @classmethod
    def tiny(cls, seed: int = 0, *, lora: bool = False, output_dim: int = 3,
             preprocess: VideoPreprocessConfig | None = None, **kwargs) -> VideoReward:
        """A random Qwen2-VL of a few hundred thousand parameters plus a byte-level tokenizer, built in memory
        (never touches the hub), prompted with our own template unless ``prompt_template=`` is given.
        ``lora=True`` wraps it with a small LoRA (r 4) like the real model. Small frames work: ``min_pixels`` is
        56*56 here."""
        tokenizer = build_tiny_tokenizer()
        config = tiny_qwen2_vl_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VideoRewardModel(config, output_dim=output_dim).eval()
            if lora:
                model = apply_lora(model, TINY_PEFT_CONFIG)
        preprocess = preprocess or VideoPreprocessConfig(min_pixels=56 * 56)
        return cls(model, tokenizer, preprocess=preprocess, **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, prompt_template_file: str | os.PathLike | None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
                        ) -> VideoReward:
        """Load a released VideoReward folder (``model_config.json`` + ``checkpoint-N/``) and VideoAlign's
        ``prompt_template.py``; ``prompt_template_file=None`` scores with our own wording, with a warning. Other
        keywords (``step``, ``fps``, ``sample_all_frames``, ``reference_pixel_range``, ``attn_implementation``):
        see ``loading.load_video_reward``. Frozen, eval, on ``device``."""
        parts = load_video_reward(folder, prompt_template_file=prompt_template_file, device=device, dtype=dtype,
                                  **kwargs)
        reward = cls(parts.model, parts.tokenizer, preprocess=parts.preprocess, normalization=parts.normalization,
                     prompt_template=parts.prompt_template)
        return reward
