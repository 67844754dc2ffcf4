"""What can happen to a live stream, as data: events indexed by the block at which they take effect.

A session is (seed, first prompt, start media, events). Every action on a :class:`~.session.Session` -
a prompt switch, a new seed, a reset, a new sink alpha - is recorded as one of the frozen dataclasses below,
stamped with the block index (counted over the whole session, across resets) *before which* it is applied.
Replaying the same events on a fresh session gives bit-identical latents, so an offline timeline
(``inference.py --timeline file.json``) and a live browser session drive the very same code.

The prompt-switch policies are listed in :data:`SWITCH_POLICIES`; what each one does to the caches is
:meth:`Session._switch_prompt` (docs/interactive.md has the table).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models.kv_cache import CausalSpec

SWITCH_POLICIES = ("cross", "recache", "recache_sink", "reset")


@dataclass(frozen=True)
class SetPrompt:
    """Switch to ``text`` with a switch policy; the text embedding moves to the new prompt over ``blend_blocks``
    blocks (0 or 1: at once), whatever the policy."""

    block: int
    text: str
    policy: str = "cross"
    blend_blocks: int = 0

    def __post_init__(self):
        if self.policy not in SWITCH_POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {SWITCH_POLICIES}")
        if self.blend_blocks < 0:
            raise ValueError(f"blend_blocks must be >= 0, got {self.blend_blocks}")
        if not self.text.strip():
            raise ValueError("the prompt is empty")


@dataclass(frozen=True)
class SetSeed:
    """Re-seed the noise: from this block on, noise is drawn from a fresh CPU generator seeded ``seed``."""

    block: int
    seed: int


@dataclass(frozen=True)
class Reset:
    """Start a new video (a new epoch): empty caches, a fresh VAE decoder; optionally a new prompt, seed, or a
    start image (pixels ``[3, H, W]`` in [-1, 1], already fitted to the video size)."""

    block: int
    text: str | None = None
    seed: int | None = None
    image: torch.Tensor | None = None


@dataclass(frozen=True)
class SetSinkAlpha:
    """EMA-sink decay from this block on: ``sink <- alpha * sink + (1 - alpha) * evicted``."""

    block: int
    alpha: float

    def __post_init__(self):
        replace(CausalSpec(), ema_alpha=self.alpha)  # the one range check of the alpha (CausalSpec's)


Event = SetPrompt | SetSeed | Reset | SetSinkAlpha


def load_timeline(path: str | os.PathLike) -> list[Event]:
    """Events of a timeline file: a JSON list of ``{"block": N, ...}`` objects, one action each.

    ``{"block": 4, "prompt": "a cat", "policy": "recache", "blend": 2}``, ``{"block": 8, "seed": 3}``,
    ``{"block": 10, "reset": true}`` (optionally with ``"prompt"`` / ``"seed"``), ``{"block": 12, "sink_alpha":
    0.99}``. Block 0 may set the first prompt. Raises ``ValueError`` naming the bad entry.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read timeline {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"timeline {path} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"timeline {path} must be a JSON list of events, got {type(entries).__name__}")
    events = []
    for i, entry in enumerate(entries):
        try:
            events.append(event_from_dict(entry))
        except ValueError as err:
            raise ValueError(f"timeline {path}, entry {i} ({json.dumps(entry)[:80]}): {err}") from None
    return sorted(events, key=lambda e: e.block)  # stable: same-block events keep the file's order


_KEYS = {"block", "prompt", "policy", "blend", "seed", "reset", "sink_alpha"}


MAX_BLEND_BLOCKS = 64


def _whole(value, name: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"'{name}' must be a whole number {bound}, got {value!r}")
    return value


def event_from_dict(entry: dict) -> Event:
    """One action as JSON -> one event: the one decoding of actions, for timeline files (:func:`load_timeline`)
    and the web app's messages alike. Keys: ``block``, then ``prompt`` (+ ``policy``, ``blend``), ``seed``,
    ``reset`` (+ ``prompt``, ``seed``) or ``sink_alpha``. Raises ``ValueError`` naming the bad key."""
    if not isinstance(entry, dict):
        raise ValueError("an event is a JSON object")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; use {sorted(_KEYS)}")
    block = _whole(entry.get("block"), "block")
    seed = entry.get("seed")
    if seed is not None:
        seed = _whole(seed, "seed", high=2**63 - 1)
    prompt = entry.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    if entry.get("reset"):
        if "sink_alpha" in entry:
            raise ValueError("one action per event: a reset takes 'prompt' and 'seed', not 'sink_alpha'")
        return Reset(block, text=prompt, seed=seed)
    actions = [key for key in ("prompt", "seed", "sink_alpha") if key in entry]
    if len(actions) > 1:
        raise ValueError(f"one action per event, got {actions} (a reset may carry a prompt and a seed)")
    if prompt is not None:
        blend = _whole(entry.get("blend", 0), "blend", high=MAX_BLEND_BLOCKS)
        return SetPrompt(block, prompt, entry.get("policy", "cross"), blend)
    if seed is not None:
        return SetSeed(block, seed)
    if "sink_alpha" in entry:
        alpha = entry["sink_alpha"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise ValueError(f"'sink_alpha' must be a number in [0, 1], got {alpha!r}")
        return SetSinkAlpha(block, float(alpha))
    raise ValueError("an event needs one of 'prompt', 'seed', 'reset' or 'sink_alpha'")
