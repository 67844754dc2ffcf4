"""A tiny deterministic text encoder for the toy world: one fixed random vector per word.

``encoder(["red fast left"]) -> [1, 3, dim]``: the three words' embeddings in order. The table is drawn from a
seeded generator at construction, so every process (and the committed teacher) sees the same embeddings; it is
a buffer, never trained. The empty prompt (the negative prompt of CFG, and the dropped condition of teacher
training) encodes to zeros: the unconditional input.
"""
from __future__ import annotations

import torch

from .world import VOCABULARY, ToyPrompt

TOKENS = 3  # words per prompt


class ToyTextEncoder(torch.nn.Module):
    """The text encoder the trainer and the pipeline call (``forward(prompts)``, ``encode_negative``)."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        table = torch.randn(len(VOCABULARY), dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("table", table / table.norm(dim=1, keepdim=True) * dim ** 0.5)
        self.dim = dim
        self.text_len = TOKENS

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.table.new_zeros(len(prompts), TOKENS, self.dim)
        for i, text in enumerate(prompts):
            if text.strip():
                words = str(ToyPrompt.parse(text)).split()  # validates: one clear line on a bad prompt
                out[i] = self.table[[VOCABULARY.index(w) for w in words]]
        return out

    def encode_negative(self, prompt: str, batch_size: int) -> torch.Tensor:
        return self([prompt] * batch_size)
