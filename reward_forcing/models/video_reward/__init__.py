"""VideoReward (VideoAlign) as a frozen, batched, torchvision-free reward model.

Reward Forcing weights its Re-DMD loss by the *motion quality* (MQ) that VideoReward assigns to each generated
video. VideoReward is Qwen2-VL-2B-Instruct with LoRA on the language model, three added special tokens
``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` in a fixed instruction prompt, and a linear ``rm_head`` read out at
those three positions: (VQ, MQ, TA) = visual quality, motion quality, text alignment.

One job per file:

* ``preprocess.py``: videos -> Qwen2-VL video patches (frame sampling, resize, pixel range, normalisation).
* ``prompt.py``: VideoAlign's training prompt (read from its ``prompt_template.py`` without executing it), the
  chat text around it, the special tokens.
* ``model.py``: ``VideoRewardModel`` (Qwen2-VL + ``rm_head``), LoRA placement, score normalisation statistics.
* ``loading.py``: the released folder (``model_config.json``, ``checkpoint-N/model.pth``, tokenizer) and its
  key layout.
* ``tiny.py``: a random model of the same classes for tests and CPU debug runs.
* ``scorer.py``: ``VideoReward.score(videos, prompts)``, what the trainer and evaluation call.

Where the numbers differ from the reference's ``reward_from_frames`` (docs/differences.md), all switchable:
pixels in [0, 1] as VideoAlign trained (``reference_pixel_range``), 2-fps frame sampling as VideoAlign trained
(``sample_all_frames``), and every sample of a batch scored (the reference scores sample 0 only).
"""
from .loading import (
    QWEN2_VL_2B_INSTRUCT, LoadedVideoReward, load_state_file, load_video_reward, select_checkpoint_dir,
    to_current_layout,
)
from .model import DEFAULT_NORMALIZATION, VideoRewardModel, apply_lora, find_lora_targets, normalization_from_config
from .preprocess import (
    CLIP_MEAN, CLIP_STD, VideoPreprocessConfig, patchify_video, preprocess_video, sample_frame_indices, smart_resize,
)
from .prompt import (
    DEFAULT_PROMPT_TEMPLATE, EVAL_DIMS, REWARD_TOKENS, VIDEOALIGN_TEMPLATES, check_prompt_template, fill_prompt,
    read_prompt_template,
)
from .scorer import VideoReward
from .tiny import TINY_PEFT_CONFIG, build_tiny_tokenizer, tiny_qwen2_vl_config

__all__ = [
    "VideoReward", "VideoRewardModel", "VideoPreprocessConfig", "LoadedVideoReward",
    "EVAL_DIMS", "REWARD_TOKENS", "DEFAULT_NORMALIZATION", "DEFAULT_PROMPT_TEMPLATE", "VIDEOALIGN_TEMPLATES",
    "CLIP_MEAN", "CLIP_STD", "QWEN2_VL_2B_INSTRUCT", "TINY_PEFT_CONFIG",
    "smart_resize", "sample_frame_indices", "patchify_video", "preprocess_video",
    "read_prompt_template", "check_prompt_template", "fill_prompt",
    "find_lora_targets", "apply_lora", "normalization_from_config",
    "to_current_layout", "load_state_file", "select_checkpoint_dir", "load_video_reward",
    "build_tiny_tokenizer", "tiny_qwen2_vl_config",
]
