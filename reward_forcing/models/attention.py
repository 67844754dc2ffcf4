"""Attention dispatch: flash-attn 3 or 2 when importable and usable, else PyTorch SDPA.

Every caller passes q, k, v as ``[B, L, heads, head_dim]`` (flash-attn's layout) and gets the output in the
same layout and **the same dtype** as q (the reference's fallback silently returned bf16, which breaks fp32
models). flash-attn only runs on CUDA in fp16/bf16 without a dense mask; anything else goes to SDPA, which on
H100 picks its own flash/cuDNN kernels, so nothing is lost when flash-attn is absent.

Masked attention (the block-causal training mode) uses a dense boolean mask with SDPA, or FlexAttention with a
block-sparse ``BlockMask`` (``auto`` on CUDA, or forced with ``flex``): flex skips fully masked tiles, which a
dense mask cannot. FlexAttention has a forward but no backward on CPU.

The backend can be forced with ``set_attention_backend("sdpa" | "flash" | "flex" | "auto")`` or the environment
variable ``REWARD_FORCING_ATTENTION`` (same values).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # FlashAttention 3 (Hopper)
    import flash_attn_interface as _fa3  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    _fa3 = None
try:  # FlashAttention 2
    import flash_attn as _fa2  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    _fa2 = None

_BACKENDS = ("auto", "sdpa", "flash", "flex")
_backend = os.environ.get("REWARD_FORCING_ATTENTION", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"REWARD_FORCING_ATTENTION={_backend!r}; expected one of {_BACKENDS}")


def set_attention_backend(name: str) -> None:
    """Choose ``auto`` (flash-attn when usable, else SDPA), ``sdpa`` or ``flash`` (error if unusable)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {_BACKENDS}")
    if name == "flash" and _fa3 is None and _fa2 is None:
        raise RuntimeError("attention backend 'flash' requested but flash-attn is not installed "
                           "(GPU hosts: pip install --no-build-isolation flash-attn)")
    _backend = name


def attention_backend_name(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> str:
    """Which kernel family a call on this device/dtype (without a mask) would use: for logs and benchmarks."""
    device = torch.device(device)
    if _flash_usable(device, dtype, has_mask=False):
        return "flash-attn-3" if _fa3 is not None else "flash-attn-2"
    return "sdpa"


def _flash_usable(device: torch.device, dtype: torch.dtype, has_mask: bool) -> bool:
    if _backend == "sdpa" or has_mask or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return _fa3 is not None or _fa2 is not None


def use_flex_for_masks(device: torch.device | str) -> bool:
    """Whether masked attention on ``device`` goes through FlexAttention (else SDPA with a dense mask)."""
    if _backend == "flex":
        return True
    return _backend == "auto" and torch.device(device).type == "cuda" and _flex_available()


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


_compiled_flex = None


def _flex_attention(q, k, v, block_mask):
    """FlexAttention, compiled on CUDA (eager flex materialises scores; compiled skips masked tiles)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def frame_block_mask(frame_mask: torch.Tensor, tokens_per_frame: int, device):
    """A flex ``BlockMask`` for a frame-level boolean mask ``[Fq, Fk]`` (True = may attend), each frame being
    ``tokens_per_frame`` consecutive tokens of the query / key sequence."""
    from torch.nn.attention.flex_attention import create_block_mask

    frames = frame_mask.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return frames[q_idx // tokens_per_frame, kv_idx // tokens_per_frame]

    return create_block_mask(mask_mod, None, None, frames.shape[0] * tokens_per_frame,
                             frames.shape[1] * tokens_per_frame, device=device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(head_dim)``.

    q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, H, D]``; attn_mask: optional bool ``[Lq, Lk]`` or
    ``[B, 1, Lq, Lk]`` (True = may attend), or a flex ``BlockMask``. Returns ``[B, Lq, H, D]`` in q's dtype.
    """
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a flex BlockMask
        out = _flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return out.transpose(1, 2).to(q.dtype)
    if _flash_usable(q.device, q.dtype, attn_mask is not None):
        if _fa3 is not None:
            out = _fa3.flash_attn_func(q, k, v)
            # Older FA3 builds return (out, lse); newer ones return the tensor.
            return out[0] if isinstance(out, tuple) else out
        return _fa2.flash_attn_func(q, k, v)
    if _backend == "flash" and attn_mask is None:
        raise RuntimeError(f"attention backend 'flash' cannot run on {q.device} with {q.dtype}")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2).to(q.dtype)
