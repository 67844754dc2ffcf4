"""Attention dispatch: SDPA fallback keeps dtype and layout, honours masks, and the backend switch validates."""
import math

import pytest
import torch

from reward_forcing.models import attention as attn


def reference_attention(q, k, v, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_sdpa_path_keeps_dtype_and_matches_softmax(dtype, tol):
    q, k, v = (torch.randn(2, 7, 3, 16).to(dtype) for _ in range(3))
    out = attn.attention(q, k, v)
    assert out.dtype == dtype and out.shape == (2, 7, 3, 16)
    assert (out.double() - reference_attention(q, k, v)).abs().max() <= tol


def test_mask_is_honoured():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    mask = torch.rand(4, 6) > 0.4
    mask[:, 0] = True
    assert (attn.attention(q, k, v, mask).double() - reference_attention(q, k, v, mask)).abs().max() <= 1e-5


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="not one of"):
        attn.set_attention_backend("xformers")
    if attn._fa2 is None and attn._fa3 is None:
        with pytest.raises(RuntimeError, match="flash-attn is not installed"):
            attn.set_attention_backend("flash")
    attn.set_attention_backend("sdpa")
    try:
        assert attn.attention_backend_name("cuda", torch.bfloat16) == "sdpa"
    finally:
        attn.set_attention_backend("auto")
    assert attn.attention_backend_name("cpu", torch.float32) == "sdpa"
