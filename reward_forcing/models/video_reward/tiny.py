"""A tiny random VideoReward built from the real classes, in memory, for tests and CPU debug runs.

A byte-level tokenizer with Qwen2-VL's special tokens and the three reward tokens, a Qwen2-VL config a few
hundred thousand parameters large that agrees with it, and a LoRA config shaped like the released one.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

from .prompt import IM_END, IM_START, IMAGE_PAD, REWARD_TOKENS, VIDEO_PAD, VISION_END, VISION_START, token_id

__all__ = ["TINY_PEFT_CONFIG", "build_tiny_tokenizer", "tiny_qwen2_vl_config"]

# The released model's peft_lora_config, at rank 4.
TINY_PEFT_CONFIG = {
    "lora_enable": True, "vision_lora": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
    "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens"], "num_lora_modules": -1,
}

# The Qwen2-VL chat format (system prompt, user turn with the video first, generation prompt), in Jinja.
TINY_CHAT_TEMPLATE = (
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


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges (one token per byte) plus Qwen's special tokens, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

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
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def tiny_qwen2_vl_config(tokenizer, tie_word_embeddings: bool = False) -> Qwen2VLConfig:
    """A Qwen2-VL config small enough for CPU tests, consistent with ``tokenizer``'s special ids:
    vision depth 1, width 32, 2 heads, patch 14 / temporal 2 / merge 2; text width 64, 2 layers,
    4 heads (2 kv heads), vocabulary = the tokenizer."""
    ids = {t: token_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, IM_END)}
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
