"""The work of a block: DiT FLOPs counted analytically, VAE-decode FLOPs counted on a meta-device copy."""
from __future__ import annotations

import torch

from ..models.kv_cache import CausalSpec
from ..models.vae import WanVAE
from ..models.wan import WanConfig


def dit_flops_per_call(cfg: WanConfig, tokens_per_frame: int, query_frames: int, key_frames: int) -> float:
    """Matmul FLOPs of one streaming forward (2 per multiply-add): per layer the self-attention q/k/v/o and
    cross-attention q/o projections, the FFN, and both attentions (cross-attention K/V are precomputed once
    per prompt); patch embedding, head and elementwise work are negligible and left out."""
    n, m, d = query_frames * tokens_per_frame, key_frames * tokens_per_frame, cfg.dim
    linear = 2 * n * (6 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * n * m * d + 4 * n * cfg.text_len * d
    return float(cfg.num_layers * (linear + attn))


def block_key_frames(spec: CausalSpec, end_frame: int) -> int:
    """Frames attended by a call on the block ending at ``end_frame`` (sink + window, the block included)."""
    return end_frame if spec.local_attn_size == -1 else min(spec.local_attn_size, end_frame)


def vae_flops_per_block(vae, frames_per_block: int, height: int, width: int) -> tuple[float, float] | None:
    """FLOPs of the streaming decode of the first block and of a later one by ``vae``'s architecture, counted by
    ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute; convolutions only). None for a
    decoder that is not a Wan VAE, or when counting fails (an estimate never fails the benchmark)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(vae, WanVAE):
        return None
    try:
        with torch.device("meta"):
            copy = WanVAE(type(vae.model).from_config(vae.model.config))
        decoder = copy.stream_decoder()
        flops = []
        with torch.no_grad():
            for _ in range(2):
                latents = torch.zeros(1, frames_per_block, copy.model.config.z_dim, *copy.latent_size(height, width),
                                      device="meta")
                with FlopCounterMode(display=False) as counter:
                    decoder.decode(latents)
                flops.append(float(counter.get_total_flops()))
        return flops[0], flops[1]
    except Exception:  # noqa: BLE001 - an estimate only: never fail the benchmark over it
        return None
