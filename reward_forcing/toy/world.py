"""The toy world: a blob on a torus, generated directly as latents, with prompts from a tiny vocabulary.

A video is ``[F, 3, H, W]`` with values in [-1, 1]: background -1, one Gaussian blob (std ``blob_sigma``
pixels) raised to +1 in the channel of its colour. The latent space *is* the pixel space (the decoder is the
identity), so every metric in ``metrics.py`` is exact on the data. The frame is a torus: the blob wraps
around the edges, so a fast blob never leaves the frame, however long the video.

Prompts are three words, ``"<colour> <speed> <direction>"``:

* colour: ``red | green | blue`` (the channel the blob lives in);
* speed: ``static`` (does not move), ``fast`` (``fast_speed`` pixels per frame) or ``any``: half of the clips
  of an ``any`` prompt are static and half fast, so a model of the data is bimodal there. That is the prompt on
  which a reward for motion has something to choose (Re-DMD should tilt the student toward fast);
* direction: ``left | right | up | down`` (ignored by static clips, so the prompt stays three words).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

COLOURS = ("red", "green", "blue")
SPEEDS = ("static", "fast", "any")
DIRECTIONS = ("left", "right", "up", "down")
VOCABULARY = COLOURS + SPEEDS + DIRECTIONS
DIRECTION_UNITS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy)


@dataclass(frozen=True)
class ToyPrompt:
    colour: str
    speed: str
    direction: str

    @classmethod
    def parse(cls, text: str) -> "ToyPrompt":
        words = text.split()
        if len(words) != 3 or words[0] not in COLOURS or words[1] not in SPEEDS or words[2] not in DIRECTIONS:
            raise ValueError(f"toy prompt {text!r} is not '<colour> <speed> <direction>' with colour in {COLOURS}, "
                             f"speed in {SPEEDS}, direction in {DIRECTIONS} (e.g. 'red fast left')")
        return cls(*words)

    def __str__(self) -> str:
        return f"{self.colour} {self.speed} {self.direction}"


def all_prompts() -> list[str]:
    """Every prompt of the vocabulary (36)."""
    return [" ".join(words) for words in itertools.product(COLOURS, SPEEDS, DIRECTIONS)]


@dataclass(frozen=True)
class ToyWorld:
    """The world's numbers. ``size`` is the latent (= pixel) side; a frame has ``size x size`` tokens with the
    toy DiT's 1x1 patch."""

    size: int = 8
    channels: int = 3
    blob_sigma: float = 1.5
    fast_speed: float = 0.75  # pixels per frame
    any_fast: float = 0.5  # probability that a clip of an `any` prompt is fast (a resampled world changes it)

    def render(self, prompts: list[str], num_frames: int, rng: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips of ``prompts``: latents ``[B, F, 3, size, size]`` and the true speed of each ``[B]`` (pixels per
        frame: 0 or ``fast_speed``; an ``any`` prompt is fast with probability ``any_fast``). Start positions are
        uniform."""
        parsed = [ToyPrompt.parse(p) for p in prompts]
        b = len(parsed)
        start = torch.rand(b, 2, generator=rng) * self.size  # (x, y)
        coin = torch.rand(b, generator=rng)
        speed = torch.tensor([self.fast_speed if p.speed == "fast" or (p.speed == "any" and c < self.any_fast) else 0.0
                              for p, c in zip(parsed, coin.tolist())])
        unit = torch.tensor([DIRECTION_UNITS[p.direction] for p in parsed])
        t = torch.arange(num_frames, dtype=torch.float32)
        centres = start[:, None, :] + speed[:, None, None] * unit[:, None, :] * t[None, :, None]  # [B, F, 2]
        blob = self.blob(centres)  # [B, F, H, W] in [0, 1]
        channel = torch.tensor([COLOURS.index(p.colour) for p in parsed])
        onehot = torch.nn.functional.one_hot(channel, self.channels).float()  # [B, 3]
        latents = -1.0 + 2.0 * onehot[:, None, :, None, None] * blob[:, :, None]
        return latents, speed

    def blob(self, centres: torch.Tensor) -> torch.Tensor:
        """Unit-peak Gaussian blobs at ``centres [..., 2]`` (x, y) on the torus: ``[..., size, size]``."""
        grid = torch.arange(self.size, dtype=torch.float32)

        def wrapped(coord: torch.Tensor) -> torch.Tensor:  # torus distance of every pixel to coord [..., size]
            d = (grid - coord[..., None]).remainder(self.size)
            return torch.minimum(d, self.size - d)

        dx, dy = wrapped(centres[..., 0]), wrapped(centres[..., 1])
        r2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2
        return torch.exp(-r2 / (2 * self.blob_sigma ** 2))


def data_reference(world: ToyWorld) -> dict[str, float]:
    """The data's own values of the gated metrics (what a perfect model would score)."""
    return {"static_motion": 0.0, "fast_motion": world.fast_speed, "speed_gap": world.fast_speed,
            "colour_accuracy": 1.0, "blobs_per_frame": 1.0, "fast_fraction_any": world.any_fast, "flicker": 0.0,
            "direction_accuracy": 1.0}


