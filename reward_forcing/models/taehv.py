"""A fast preview decoder for Wan2.1 latents, compatible with the public TAEHV ``taew2_1`` weights.

TAEHV ("tiny autoencoder for video", MIT licensed, by Ollin Boer Bohan) decodes the *normalised* Wan2.1 latents
the DiT produces straight to pixels with ~10 M parameters, several times faster than the Wan VAE's decoder
(73 M), at lower fidelity. We use it only for live previews; the Wan VAE stays the default decoder and the
one that writes videos. Only the decoder is implemented; its module layout reproduces the checkpoint's key
names (``decoder.<index>.…`` of one sequential stack), so ``taew2_1.pth`` / ``.safetensors`` load strictly.

The decoder stack (latent channels 16 -> widths 256, 128, 64, 64 -> RGB):

* ``tanh(x / 3) * 3`` soft clamp, 3x3 conv to 256, ReLU;
* three stages of: 3 memory blocks, 2x nearest upsampling in space, a temporal "grow" (a 1x1 conv that turns
  each time step into ``stride`` consecutive ones; stride 1 in the first stage, 2 in the next two), a 3x3 conv
  to the next width;
* ReLU, 3x3 conv to RGB, clamp to [0, 1] (returned here as [-1, 1], the project's convention).

A **memory block** sees its own input at the previous time step (zeros before the first one):
``relu(convs(cat[x_t, x_{t-1}]) + x_t)`` (so a latent frame influences the next 8 at most: 3 memory blocks per
stage, running at 1, 1 and 1/2 latent per step). That one-step memory is the decoder's whole causal state, so decoding
block by block with the last input of each memory block carried over (:class:`TAEHVStreamDecoder`) equals
decoding the whole clip at once. Time grows 4x; the first 3 output frames of a video are dropped so that ``F``
latent frames give ``1 + 4 (F - 1)`` pixel frames, aligned with the Wan VAE.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..file_io import load_safetensors_file, load_torch_file

LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)
TIME_GROWTH = (1, 2, 2)  # temporal stride of each stage's grow layer (taew2_1: no growth in the first stage)


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemoryBlock(nn.Module):
    """``relu(convs(cat[x, past]) + x)`` on frames ``[N, C, H, W]``; ``past`` is the same layer's previous input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.ReLU(), _conv3x3(channels, channels),
                                  nn.ReLU(), _conv3x3(channels, channels))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TimeGrow(nn.Module):
    """Each time step becomes ``stride`` consecutive ones: a 1x1 conv to ``stride * C`` channels, split in time."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)  # channel group j -> time offset j


class TAEHVDecoder(nn.Module):
    """The TAEHV decoder (``taew2_1`` layout); :meth:`decode` and :meth:`stream_decoder` mirror ``WanVAE``."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [SoftClamp(), _conv3x3(LATENT_CHANNELS, WIDTHS[0]), nn.ReLU()]
        for stage, stride in enumerate(TIME_GROWTH):
            width, next_width = WIDTHS[stage], WIDTHS[stage + 1]
            layers += [MemoryBlock(width), MemoryBlock(width), MemoryBlock(width), nn.Upsample(scale_factor=2),
                       TimeGrow(width, stride), _conv3x3(width, next_width, bias=False)]
        layers += [nn.ReLU(), _conv3x3(WIDTHS[-1], 3)]
        self.decoder = nn.Sequential(*layers)
        self.time_upscale = 1
        for stride in TIME_GROWTH:
            self.time_upscale *= stride
        self.frames_to_trim = self.time_upscale - 1

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, device=None, dtype: torch.dtype = torch.float32) -> "TAEHVDecoder":
        """Load ``taew2_1.pth`` or ``taew2_1.safetensors`` (decoder keys; the encoder's are ignored)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TAEHV weights {path} do not exist")
        state = load_safetensors_file(path) if path.suffix == ".safetensors" else load_torch_file(path)
        model = cls()
        model.load_decoder_state_dict(state)
        return model.to(device=device, dtype=dtype).eval()

    def load_decoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strictly load the ``decoder.*`` entries of a TAEHV state dict.

        A grow layer trained with a larger temporal stride than this model uses keeps its last time step's
        output channels (how TAEHV checkpoints are shared between decoder variants).
        """
        own = self.state_dict()
        decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
        missing = sorted(set(own) - set(decoder))
        unexpected = sorted(set(decoder) - set(own))
        if missing or unexpected:
            raise ValueError(f"not a taew2_1 decoder: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
        for key, value in decoder.items():
            want = own[key].shape
            if value.shape != want and isinstance(self.get_submodule(key.rsplit(".", 2)[0]), TimeGrow) \
                    and value.shape[1:] == want[1:] and value.shape[0] > want[0]:
                decoder[key] = value[-want[0]:]
            elif value.shape != want:
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(want)}")
        self.load_state_dict(decoder)

    # ------------------------------------------------------------------ geometry (as WanVAE)
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    # ------------------------------------------------------------------ decoding
    def _run(self, latents: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
        """Frames ``[B, T, C, h, w]`` through the stack, all time steps of a layer at once; ``memory[i]`` is
        memory block i's last input (updated in place). Returns ``[B, T * time_upscale, 3, H, W]`` in [0, 1]."""
        b = latents.shape[0]
        x = latents.to(device=self.device, dtype=self.dtype)
        t = x.shape[1]
        x = x.reshape(b * t, *x.shape[2:])
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemoryBlock):
                frames = x.reshape(b, t, *x.shape[1:])
                previous = memory[i] if memory[i] is not None else torch.zeros_like(frames[:, :1])
                past = torch.cat([previous, frames[:, :-1]], dim=1).reshape(x.shape)
                memory[i] = frames[:, -1:]
                x = layer(x, past)
            else:
                x = layer(x)
                if isinstance(layer, TimeGrow):
                    t *= layer.stride
        return x.reshape(b, t, *x.shape[1:]).clamp(0, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole clip: normalised latents ``[B, F, 16, h, w]`` -> pixels ``[B, 1 + 4 (F - 1), 3, 8h, 8w]`` in
        [-1, 1]."""
        memory = [None] * len(self.decoder)
        return self._run(latents, memory)[:, self.frames_to_trim:] * 2 - 1

    def stream_decoder(self) -> "TAEHVStreamDecoder":
        return TAEHVStreamDecoder(self)


class TAEHVStreamDecoder:
    """Block-by-block decoding with the decoder's own state (each memory block's last input); the outputs of
    consecutive calls concatenate to :meth:`TAEHVDecoder.decode` of the whole clip. Same interface as the Wan
    VAE's stream decoder: the first chunk of a video gives ``4 f - 3`` frames, later ones ``4 f``."""

    def __init__(self, model: TAEHVDecoder):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._memory: list[torch.Tensor | None] = [None] * len(self.model.decoder)
        self._to_trim = self.model.frames_to_trim

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.model._run(latents, self._memory)
        trim, self._to_trim = min(self._to_trim, pixels.shape[1]), self._to_trim - min(self._to_trim, pixels.shape[1])
        return pixels[:, trim:] * 2 - 1
