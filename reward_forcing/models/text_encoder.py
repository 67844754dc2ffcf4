"""umt5-xxl text encoder (Wan's ``WanTextEncoder``) on top of transformers' ``UMT5EncoderModel``.

Wan ships its own T5 implementation and checkpoint (``models_t5_umt5-xxl-enc-bf16.pth``); its encoder is
numerically the HF ``UMT5EncoderModel`` (one relative-position table per layer, gated GELU-tanh FFN, T5
RMS-norm, unscaled attention), so only the key names need converting (``convert_wan_t5_state_dict``).

Output contract (what the DiT expects as ``context``): ``[B, text_len=512, d_model]``; every prompt is
cleaned the way Wan's tokenizer wrapper does (ftfy, double HTML unescape, whitespace collapse), tokenised
to exactly 512 tokens (T5 ``</s>`` appended, right padding with id 0), encoded with the attention mask,
and the rows at and after the prompt's true length are set to zero. The DiT embeds those zero rows
through its text MLP and attends to them, so the padding length (512, not diffusers' default 226) matters.
"""
from __future__ import annotations

import math

import html
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import torch

if TYPE_CHECKING:  # transformers is imported where it is used: a toy run never loads it (seconds per process)
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from ..file_io import load_torch_file


__all__ = [
    "WAN_T5_CHECKPOINT",
    "WAN_T5_TOKENIZER_DIR",
    "clean_prompt",
    "convert_wan_t5_state_dict",
    "umt5_config_from_wan",
    "umt5_xxl_config",
    "build_tiny_tokenizer",
    "TextEncoder",
]

WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_T5_TOKENIZER_DIR = os.path.join("google", "umt5-xxl")
TEXT_LEN = 512

def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"missing {what}: '{path}' does not exist")
    return path


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'`` prompt cleaning: ftfy, HTML-unescape twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------- weights and config

# Per-block renames, Wan ``T5Encoder`` -> ``UMT5EncoderModel`` (suffix after ``blocks.{i}.``).
_BLOCK_KEY_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU-tanh branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def convert_wan_t5_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan ``T5Encoder`` state dict to ``UMT5EncoderModel`` keys (tensors are not copied).

    ``token_embedding.weight`` becomes both ``shared.weight`` and the tied ``encoder.embed_tokens.weight``, so
    ``load_state_dict(..., strict=True)`` reports nothing missing or unexpected. Unknown keys (e.g. a shared
    position table, ``shared_pos=True``, which UMT5 cannot represent) raise ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif match and match.group(2) in _BLOCK_KEY_MAP:
            out[f"encoder.block.{match.group(1)}.{_BLOCK_KEY_MAP[match.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys not in the Wan T5 encoder layout: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def umt5_config_from_wan(vocab: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_layers: int,
                         num_buckets: int = 32, shared_pos: bool = False) -> UMT5Config:
    """The ``UMT5Config`` equivalent to Wan's ``T5Encoder(vocab, dim, dim_attn, dim_ffn, num_heads, num_layers,
    num_buckets, shared_pos)`` (the constructor arguments listed in ``t5_tiny.json``).

    Dropout is 0: the encoder is only ever used frozen, in eval mode.
    """
    if shared_pos:
        raise ValueError("shared_pos=True (one position table for all layers) has no UMT5 equivalent")
    if dim_attn % num_heads:
        raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab, d_model=dim, d_kv=dim_attn // num_heads, d_ff=dim_ffn, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=num_buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
    )


def umt5_xxl_config() -> UMT5Config:
    """Config of Wan's umt5-xxl encoder (5.7B parameters)."""
    return umt5_config_from_wan(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24)


def build_tiny_tokenizer(max_length: int = TEXT_LEN) -> PreTrainedTokenizerFast:
    """In-memory character-level T5-style tokenizer (no hub access) for tests and the tiny config.

    Ids: 0 ``<pad>``, 1 ``</s>`` (appended to every sequence), 2 ``<unk>``, 3 ``▁`` (word start, as in
    SentencePiece), then the printable ASCII characters 33..126 (ids 4..97); everything fits a vocab of 256.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]
    tokenizer = Tokenizer(models.Unigram([(piece, -1.0) for piece in pieces], unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length, padding_side="right")


# --------------------------------------------------------------------------- the module

class TextEncoder(torch.nn.Module):
    """Frozen umt5 encoder + tokenizer: ``forward(prompts) -> [B, text_len, dim]`` (see module docstring).

    Attributes: ``encoder`` (``UMT5EncoderModel``), ``tokenizer``, ``text_len`` (512), ``dim`` (d_model).
    The output has the encoder's dtype and lives on the encoder's device.
    """

    def __init__(self, encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = TEXT_LEN):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.dim = encoder.config.d_model
        self._negative: tuple[tuple, torch.Tensor] | None = None  # (cache key, embeddings)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_wan_folder(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "TextEncoder":
        """Load Wan's layout: ``<folder>/models_t5_umt5-xxl-enc-bf16.pth`` + tokenizer ``<folder>/google/umt5-xxl/``.

        The model is built on the meta device and the checkpoint tensors are assigned (memory-mapped, read by
        ``file_io``, which names a corrupt file in one line), so the 5.7B weights are never randomly initialised
        nor held twice before the final ``.to(device, dtype)``.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        checkpoint = _existing(folder / WAN_T5_CHECKPOINT, "Wan T5 checkpoint")
        tokenizer_dir = _existing(folder / WAN_T5_TOKENIZER_DIR, "umt5-xxl tokenizer folder")
        state_dict = load_torch_file(checkpoint)  # memory-mapped
        with torch.device("meta"):
            encoder = UMT5EncoderModel(umt5_xxl_config())
        encoder.load_state_dict(convert_wan_t5_state_dict(state_dict), strict=True, assign=True)
        encoder.set_input_embeddings(encoder.shared)  # re-tie: assign=True loaded two separate Parameters
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder.to(device=device, dtype=dtype), tokenizer)

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> "TextEncoder":
        """Load an HF-format encoder: either one folder holding ``config.json``, the weights and the tokenizer
        files, or a Diffusers repo root with ``text_encoder/`` and ``tokenizer/`` sub-folders.

        Every parameter is cast to ``dtype`` (transformers would otherwise keep the ``wo`` layers in fp32),
        matching Wan, which runs the whole encoder in one dtype.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        if (folder / "text_encoder").is_dir():
            encoder_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
        else:
            encoder_dir = tokenizer_dir = folder
        _existing(encoder_dir / "config.json", "text encoder config")
        _existing(tokenizer_dir, "tokenizer folder")
        encoder = UMT5EncoderModel.from_pretrained(encoder_dir, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder.to(device=device, dtype=dtype), tokenizer)

    @classmethod
    def tiny(cls, seed: int = 0, dim: int = 32, num_heads: int = 4, num_layers: int = 2,
             text_len: int = TEXT_LEN) -> "TextEncoder":
        """Random tiny encoder (vocab 256, FFN 2*dim, the shape of ``t5_tiny.json`` by default) with the
        in-memory character tokenizer. Seeded without disturbing the global RNG; never touches a hub."""
        from transformers import UMT5EncoderModel

        config = umt5_config_from_wan(vocab=256, dim=dim, dim_attn=dim, dim_ffn=2 * dim, num_heads=num_heads,
                                      num_layers=num_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = UMT5EncoderModel(config)
        return cls(encoder, build_tiny_tokenizer(text_len), text_len=text_len)

    @classmethod
    @torch.no_grad()
    def random(cls, config: UMT5Config | None = None, *, seed: int = 0, device="cpu",
               dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """A real-size encoder (``umt5_xxl_config()`` by default) with random weights drawn on ``device`` and the
        character-level tokenizer (the real one ships with the checkpoint; prompts are padded to 512 tokens
        either way, so the encoder does the same work): for benchmarks, no download."""
        from transformers import UMT5EncoderModel

        with torch.device("meta"):
            encoder = UMT5EncoderModel(config or umt5_xxl_config())
        encoder = encoder.to(dtype=dtype).to_empty(device=device)
        encoder.set_input_embeddings(encoder.shared)  # re-tie: to_empty gave the two users separate copies
        rng = torch.Generator(device=device).manual_seed(seed)
        for name, p in encoder.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=rng)
        return cls(encoder, build_tiny_tokenizer())

    # ------------------------------------------------------------------ encoding
    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.shared.weight.device

    @torch.no_grad()
    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        """``prompts`` (B strings) -> ``[B, text_len, dim]``, rows past each prompt's length (incl. ``</s>``) zero."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.to(self.dtype)
        lengths = mask.gt(0).sum(dim=1)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return hidden.masked_fill(~valid[..., None], 0.0)

    def encode_negative(self, prompt: str, batch_size: int) -> torch.Tensor:
        """``[batch_size, text_len, dim]`` embeddings of a negative prompt, encoded once and cached.

        The cache holds one entry, keyed by (prompt, batch size, device, dtype); any change re-encodes.
        Treat the returned tensor as read-only (it is shared between calls).
        """
        key = (prompt, batch_size, self.device, self.dtype)
        if self._negative is None or self._negative[0] != key:
            self._negative = (key, self.forward([prompt] * batch_size))
        return self._negative[1]
