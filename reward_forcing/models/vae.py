"""Wan2.1 VAE: diffusers' ``AutoencoderKLWan`` behind a pipeline-level interface.

Layouts
-------
* Pipeline layout (what the generator produces and what this module takes/returns): ``[B, F, C, H, W]``,
  frame-major.
* diffusers / original Wan VAE layout: ``[B, C, F, H, W]``. The permute happens only inside this module.

Latents seen by the rest of the package are *normalised* per channel with the 16 Wan constants
(``WAN_LATENT_MEAN`` / ``WAN_LATENT_STD``). The official wrapper passes ``scale = [mean, 1/std]`` and
computes ``z / scale[1] + scale[0]`` to de-normalise and ``(mu - scale[0]) * scale[1]`` to normalise; the
same arithmetic is used here (``z / (1/std)`` can differ from ``z * std`` by one ulp).

Time: latent frame 0 decodes to 1 pixel frame, every later latent frame to 4, so ``F`` latent frames give
``1 + 4 (F - 1)`` pixel frames; encoding needs ``T = 1 + 4k`` pixel frames. Space is scaled by 8.

The VAE is frozen: every entry point runs under ``torch.no_grad``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # diffusers is imported where it is used: a toy run never loads it (seconds per process)
    from diffusers import AutoencoderKLWan

from ..file_io import load_torch_file

__all__ = ["WAN_LATENT_MEAN", "WAN_LATENT_STD", "WanVAE", "WanStreamDecoder"]

WAN_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Architecture of the real Wan2.1 VAE (these are also diffusers' defaults).
WAN21_VAE_ARCH = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)
# Tiny architecture of the golden test vectors (num_res_blocks must stay 2: diffusers' key converter
# hard-codes the decoder block indices for two residual blocks per stage).
TINY_VAE_ARCH = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)

def arch_strides(arch: dict) -> tuple[int, int]:
    """``(spatial, temporal)`` stride of a Wan VAE architecture (``WAN21_VAE_ARCH``: 8 and 4): pixels per latent
    pixel, and pixel frames per latent frame after the first."""
    return 2 ** (len(arch["dim_mult"]) - 1), 2 ** sum(bool(d) for d in arch["temperal_downsample"])


def _channel_constants(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel constants shaped ``[C, 1, 1, 1]`` for broadcasting over a ``[B, C, F, H, W]`` tensor."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


class WanVAE(torch.nn.Module):
    """Frozen Wan2.1 VAE with pipeline-layout ``encode`` / ``decode`` and a streaming decoder.

    ``self.model`` is the diffusers ``AutoencoderKLWan``; inputs are cast to its dtype and device.
    """

    def __init__(self, model: AutoencoderKLWan):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_original_state_dict(cls, state_dict: dict[str, torch.Tensor], **arch) -> "WanVAE":
        """Build from a state dict with the original Wan key names (``Wan2.1_VAE.pth`` naming).

        ``arch`` are ``AutoencoderKLWan`` constructor arguments (default: the real Wan2.1 VAE). The module is
        created on the meta device and the converted tensors are assigned, so weights are materialised once;
        the resulting parameters keep the dtype/device of ``state_dict``. Loading is strict.
        """
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        arch = {**WAN21_VAE_ARCH, **arch}
        with torch.device("meta"):
            model = AutoencoderKLWan(**arch)
        model.load_state_dict(convert_wan_vae_to_diffusers(state_dict), strict=True, assign=True)
        return cls(model)

    @classmethod
    def from_wan_pth(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> "WanVAE":
        """Load the original ``Wan2.1_VAE.pth`` (real architecture)."""
        state_dict = load_torch_file(path)
        return cls.from_original_state_dict(state_dict).to(device=device, dtype=dtype)

    @classmethod
    def random(cls, arch: dict = WAN21_VAE_ARCH, seed: int = 0) -> "WanVAE":
        """A VAE of ``arch`` with diffusers' default initialisation under ``seed`` (the global RNG untouched): the
        real Wan2.1 architecture (127M parameters, a second or two on a CPU) for benchmarks, or ``TINY_VAE_ARCH``."""
        from diffusers import AutoencoderKLWan

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**arch)
        return cls(model)

    @classmethod
    def tiny(cls, seed: int = 0) -> "WanVAE":
        """Randomly initialised tiny VAE (``TINY_VAE_ARCH``, ~0.9M params) for tests and the tiny config."""
        return cls.random(TINY_VAE_ARCH, seed)

    # ------------------------------------------------------------------ geometry
    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along height and width (8 for Wan2.1)."""
        return arch_strides(self.model.config)[0]

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        return arch_strides(self.model.config)[1]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(h, w)`` of a ``height x width`` video; both must be multiples of the spatial stride."""
        s = self.spatial_stride
        if height <= 0 or width <= 0 or height % s or width % s:
            raise ValueError(f"video size {height}x{width} must be positive multiples of the VAE's stride {s}")
        return height // s, width // s

    def video_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latent frames: ``1 + 4 (F - 1)`` (81 for 21)."""
        return 1 + self.temporal_stride * (latent_frames - 1) if latent_frames > 0 else 0

    def chunk_frames(self, latent_frames: int, *, first: bool) -> int:
        """Pixel frames a stream decoder returns for a chunk: ``4 f``, minus 3 on the video's first chunk."""
        return self.video_frames(latent_frames) if first else self.temporal_stride * latent_frames

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.model.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.post_quant_conv.weight.device

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised pipeline latents ``[B, F, 16, h, w]`` -> raw VAE latents ``[B, 16, F, h, w]``."""
        z = latents.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        inv_std = 1.0 / _channel_constants(WAN_LATENT_STD, z)
        return z / inv_std + _channel_constants(WAN_LATENT_MEAN, z)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Full decode. ``[B, F, 16, h, w]`` normalised -> pixels ``[B, 1 + 4(F-1), 3, 8h, 8w]`` in [-1, 1].

        This is the official ``decode_to_pixel`` (de-normalise, decode frame by frame with the causal cache,
        clamp). It runs a fresh stream decoder over all frames, so a chunked stream decode is bit-identical.
        """
        return self.stream_decoder().decode(latents)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` in [-1, 1], T = 1 + 4k -> normalised posterior mode ``[B, 1 + k, 16, H/8, W/8]``."""
        num_frames = pixels.shape[1]
        if num_frames % 4 != 1:
            raise ValueError(f"the Wan VAE encodes 1 + 4k frames, got {num_frames}")
        x = pixels.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        mu = self.model.encode(x).latent_dist.mode()
        normalised = (mu - _channel_constants(WAN_LATENT_MEAN, mu)) * (1.0 / _channel_constants(WAN_LATENT_STD, mu))
        return normalised.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> "WanStreamDecoder":
        """A fresh streaming decoder (its own causal cache) over this VAE."""
        return WanStreamDecoder(self)


class WanStreamDecoder:
    """Decodes a latent video chunk by chunk, carrying the VAE's causal conv cache between calls.

    Concatenating the outputs of ``decode`` over consecutive chunks is bit-identical to one
    ``WanVAE.decode`` of the whole latent: both push latent frames one at a time through diffusers'
    ``WanDecoder3d`` with the same feature cache (``AutoencoderKLWan._decode`` cannot be used because it
    clears the cache on entry and exit). The first latent frame ever seen yields 1 pixel frame, every later
    one 4.

    ``post_quant_conv`` (a 1x1x1 conv) is applied one frame at a time as well: on CPU its result for a
    1-frame input differs from the same frame inside a longer input by ~1e-7, which would otherwise make
    the output depend on where the chunk boundaries fall. (diffusers' ``decode`` applies it to all frames
    at once, so it can differ from this by that rounding, far below the parity tolerance of the tests.)
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget all previous chunks; the next chunk starts a new video."""
        self._feat_cache: list[torch.Tensor | None] = [None] * self.vae.model._cached_conv_counts["decoder"]
        self._first_frame = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, f, 16, h, w]`` normalised -> ``[B, n, 3, 8h, 8w]`` in [-1, 1], n = 4f (minus 3 on the first chunk)."""
        model = self.vae.model
        z = self.vae.denormalise(latents)
        frames = []
        for i in range(z.shape[2]):
            x = model.post_quant_conv(z[:, :, i:i + 1])
            frames.append(model.decoder(x, feat_cache=self._feat_cache, feat_idx=[0], first_chunk=self._first_frame))
            self._first_frame = False
        pixels = torch.cat(frames, dim=2).clamp(-1.0, 1.0)
        return pixels.permute(0, 2, 1, 3, 4)


class IdentityVAE(torch.nn.Module):
    """The decoder of a world that lives in latent space (the toy world): latents *are* pixels.

    It answers the same questions as :class:`WanVAE` (geometry, ``encode`` / ``decode``, a stream decoder) with
    stride 1 in space and time, so the trainer, the pipeline and the session run unchanged on such a world.
    ``decode`` clamps to [-1, 1] like the Wan VAE.
    """

    spatial_stride = 1
    temporal_stride = 1

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros((), dtype=dtype), persistent=False)  # follows .to()

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        if height <= 0 or width <= 0:
            raise ValueError(f"video size {height}x{width} must be positive")
        return height, width

    def video_frames(self, latent_frames: int) -> int:
        return max(latent_frames, 0)

    def chunk_frames(self, latent_frames: int, *, first: bool) -> int:
        return latent_frames

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(device=self.device, dtype=self.dtype).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(device=self.device, dtype=self.dtype)

    def stream_decoder(self) -> "IdentityStreamDecoder":
        return IdentityStreamDecoder(self)


class IdentityStreamDecoder:
    """Stateless stream decoder of :class:`IdentityVAE` (``reset`` exists for the interface)."""

    def __init__(self, vae: IdentityVAE):
        self.vae = vae

    def reset(self) -> None:
        pass

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)
