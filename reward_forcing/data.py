"""Prompt files, per-rank sharding and the resumable training prompt sampler.

Inference reads a prompt file (one prompt per line) and optionally a parallel "extended" file whose
line i is an LLM-expanded version of line i. The model is conditioned on the extended text, while
the output video is named after the original, short prompt and its line number, so results can be
matched to the benchmark list line by line.

Fixes relative to the reference (docs/differences.md): inference shards prompts across ranks without
dropping the tail (the reference's ``drop_last=True`` loses 3 of 1003 MovieGen prompts on 8 GPUs),
and the training sampler reshuffles every epoch and can be checkpointed and resumed, also on another
number of ranks.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from .file_io import load_torch_file

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its 0-based line number in the file, the original text and the extended text.

    ``index`` and ``text`` name the output; ``conditioning`` is what the text encoder sees.
    """

    index: int
    text: str
    extended: str | None = None

    @property
    def conditioning(self) -> str:
        return self.extended if self.extended is not None else self.text


def read_lines(path: str | os.PathLike) -> list[str]:
    """All lines of a UTF-8 text file, stripped, blank ones kept as "" so line numbers stay exact.

    Splits on ``\\n`` only (``str.splitlines`` would also split on form feeds and unicode line
    separators that can occur inside a prompt); a BOM and ``\\r`` line ends are tolerated.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a prompt file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"prompt file '{p}' {what}. Use a text file with one prompt per line, e.g. "
            f"prompts/example.txt, or fetch the benchmark lists with `python scripts/fetch_prompts.py`."
        )
    text = p.read_text(encoding="utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line is not an extra empty line
        lines.pop()
    return [line.strip() for line in lines]


def read_prompts(path: str | os.PathLike, extended_path: str | os.PathLike | None = None) -> list[Prompt]:
    """Read prompts (and optionally their extended versions, line-aligned) into ``Prompt`` records.

    Blank lines are skipped but keep their line number, so ``Prompt.index`` is always the 0-based
    line of the prompt in ``path``. Errors: FileNotFoundError for a missing file, ValueError for a
    file without prompts, an extended file with a different number of lines, or an extended line
    that is blank where the prompt is not.
    """
    lines = read_lines(path)
    if not any(lines):
        raise ValueError(f"no prompts in '{path}' (the file is empty or only has blank lines)")
    extended: list[str] | None = None
    if extended_path is not None:
        extended = read_lines(extended_path)
        if len(extended) != len(lines):
            raise ValueError(
                f"'{extended_path}' has {len(extended)} lines but '{path}' has {len(lines)}; an extended "
                f"prompt file must have exactly one line per prompt, in the same order."
            )
    prompts = []
    for i, line in enumerate(lines):
        if not line:
            continue
        ext = None
        if extended is not None:
            ext = extended[i]
            if not ext:
                raise ValueError(f"line {i + 1} of '{extended_path}' is blank but line {i + 1} of '{path}' "
                                 f"is a prompt ({line[:40]!r}); the two files are not aligned.")
        prompts.append(Prompt(index=i, text=line, extended=ext))
    return prompts


def shard_for_rank(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, ...``: every item goes to exactly one rank, none dropped.

    Shards differ in length by at most one; a rank may get nothing when there are fewer items than
    ranks (it then simply has no work).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


class PromptSampler(Generic[T]):
    """Infinite, seeded, resumable stream of items for one rank of a training job.

    Epoch ``e`` walks the permutation drawn with seed ``seed + e`` (the same on every rank), so each epoch has
    a new order, unlike the reference whose order repeats. Ranks take strided slices of it and are therefore
    disjoint: after every rank took ``k`` items, exactly the first ``k * world_size`` items of the permutation
    are used. When the items left are not a multiple of ``world_size`` they are padded with the permutation's
    own first items (as ``DistributedSampler(drop_last=False)`` does), so all ranks see the same number of
    items per epoch and change epoch in step; only those few padded items are seen twice in that epoch.

    ``state_dict()`` / ``load_state_dict()`` record where the epoch stands, so a resumed job continues with
    the very next item. A job resumed on a different number of ranks re-partitions what is left of the
    current epoch among its ranks (no item of the epoch is skipped or repeated, beyond padding) and then
    continues with whole epochs.
    """

    def __init__(self, items: Sequence[T], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if len(items) == 0:
            raise ValueError("PromptSampler needs at least one item")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.items = list(items)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0  # items of this epoch's permutation used before the current partition (a resume)
        self.position = 0  # index of the next item within this rank's part of the partition
        self._shard: list[int] | None = None

    @property
    def per_rank(self) -> int:
        """Items each rank takes from the current partition of the epoch."""
        return -(-(len(self.items) - self.start) // self.world_size)  # ceil

    def _epoch_indices(self) -> list[int]:
        n = len(self.items)
        if self.shuffle:
            rng = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=rng).tolist()
        else:
            order = list(range(n))
        left = order[self.start:]
        total = self.per_rank * self.world_size
        padded = left + order[:total - len(left)]
        return padded[self.rank::self.world_size]

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self.position >= self.per_rank:
            self.epoch += 1
            self.start = self.position = 0
            self._shard = None
        if self._shard is None:
            self._shard = self._epoch_indices()
        item = self.items[self._shard[self.position]]
        self.position += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start": self.start, "position": self.position, "seed": self.seed,
                "num_items": len(self.items), "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` of any rank (all ranks stand at the same position). Refuses a state
        from a different prompt list, seed or order, since the position would then point at other prompts."""
        for key, mine in (("num_items", len(self.items)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume PromptSampler: saved {key}={state[key]!r} but this run has {mine!r}. "
                    f"Use the same prompt file and seed, or start the sampler fresh."
                )
        saved_world = int(state.get("world_size", self.world_size))
        epoch, start, position = int(state["epoch"]), int(state.get("start", 0)), int(state["position"])
        saved_per_rank = -(-(len(self.items) - start) // saved_world)
        if not 0 <= start < len(self.items) or not 0 <= position <= saved_per_rank:
            raise ValueError(f"saved sampler position (start {start}, position {position}) is outside this "
                             f"prompt list of {len(self.items)} items")
        self.epoch, self.start, self.position = epoch, start, position
        if saved_world != self.world_size:
            used = start + position * saved_world  # the saved ranks took a prefix of the epoch's permutation
            if used >= len(self.items):
                self.epoch, self.start = epoch + 1, 0
            else:
                self.start = used
            self.position = 0
        self._shard = None


# --------------------------------------------------------------------------------------------------
# Latent videos: what teacher training and ODE regression read
# --------------------------------------------------------------------------------------------------
class LatentVideos:
    """Training items that are latent videos with their prompts, drawn through a :class:`PromptSampler` over
    ``items`` (so they shard across ranks and resume like prompts): ``get(items) -> (latents, prompts)`` with
    latents ``[B, ...]`` stacked.

    Three sources, chosen by :func:`latent_videos`: the toy world (clips drawn on the fly for the sampled
    prompts), a folder of ``.pt`` files ``{"latents": [F, C, h, w], "prompt": str}`` (e.g. videos encoded with the
    Wan VAE), and an ODE-pairs file from ``scripts/generate_ode_pairs.py`` (items: trajectories ``[S + 1, F, C,
    h, w]``, the states at the student's timesteps followed by the teacher's clean sample).
    """

    def __init__(self, items: Sequence, get):
        self.items, self._get = list(items), get

    def get(self, items: Sequence) -> tuple[torch.Tensor, list[str]]:
        return self._get(list(items))


def toy_videos(num_frames: int, seed: int = 0, any_fast: float = 0.5) -> LatentVideos:
    """The toy world's clips (every prompt of its vocabulary), rendered on the fly from a seeded generator;
    ``any_fast``: the probability that an ``any`` clip is fast (0.5 in the world; other values resample it)."""
    from .toy import ToyWorld, all_prompts

    world, rng = ToyWorld(any_fast=any_fast), torch.Generator().manual_seed(seed)
    return LatentVideos(all_prompts(), lambda prompts: (world.render(prompts, num_frames, rng)[0], prompts))


def latent_folder(path: str | os.PathLike) -> LatentVideos:
    files = sorted(Path(path).glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no latent videos (*.pt) in '{path}'; each file holds "
                                "{'latents': [F, C, h, w], 'prompt': str}")

    def get(paths):
        loaded = [load_torch_file(p) for p in paths]
        return torch.stack([item["latents"] for item in loaded]), [item["prompt"] for item in loaded]

    return LatentVideos(files, get)


ODE_PAIRS_KEYS = ("states", "prompts", "timesteps")


def ode_pairs(path: str | os.PathLike) -> LatentVideos:
    """The trajectories of an ODE-pairs file (``scripts/generate_ode_pairs.py``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ODE pairs file '{path}' does not exist; write it with "
                                "scripts/generate_ode_pairs.py (training.ode_pairs_path)")
    data = load_torch_file(path)
    if not isinstance(data, dict) or any(k not in data for k in ODE_PAIRS_KEYS):
        raise ValueError(f"'{path}' is not an ODE-pairs file: it needs the keys {ODE_PAIRS_KEYS}")
    states, prompts = data["states"], data["prompts"]
    return LatentVideos(range(len(prompts)), lambda idx: (states[idx], [prompts[i] for i in idx]))


def latent_videos(spec: str, *, num_frames: int, seed: int = 0, toy_any_fast: float = 0.5) -> LatentVideos:
    """``training.latent_data``: ``toy`` (``training.toy_any_fast``) or a folder of latent ``.pt`` files."""
    if spec == "toy":
        return toy_videos(num_frames, seed, toy_any_fast)
    if not spec:
        raise ValueError("training.mode=teacher needs training.latent_data: 'toy' or a folder of latent .pt files")
    return latent_folder(spec)
