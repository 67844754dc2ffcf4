"""The live features measured in the toy world, where every metric is exact: prompt switches, image start, video
extension and two speed levers (scripts/toy_studies.py runs them; docs/interactive.md and docs/toy_world.md
show the tables).

Everything generates through the project's own :class:`~reward_forcing.interactive.Session` (the live app's loop)
or :class:`~reward_forcing.pipeline.StreamingPipeline`, on a trained toy student, and measures with
``metrics.py``. Frames and latents are the same thing in the toy world (identity decoder), so positions are read
straight off the latents.

Definitions (``s`` = the first frame generated after the switch, ``3 k`` for a switch before block ``k``):

* **latency** (frames): the smallest ``j >= 0`` such that the new attribute holds on every frame (colour) or
  every 3-frame window (direction, speed) from ``s + j`` to the end of the clip; a clip where it never holds counts
  as not switched (its latency is infinite);
* **jump** (pixels): how far the blob at frame ``s`` lands from anywhere a continuous motion could take it from
  frame ``s - 1``: the distance from its step ``s - 1 -> s`` to the segment between the velocity fitted over the 3
  frames before (keeping the old motion) and the new prompt's velocity (obeying at once); 0 is continuous.
  ``jump_from_old_motion`` (reported, not gated) measures from the old motion alone: it charges a perfect
  immediate switch ``|v_new - v_old|`` (1.06 px for a 90-degree turn at 0.75 px/frame, 0.75 for a stop);
* **stability**: colour accuracy against the new prompt and blobs per frame over the frames after the switch.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..interactive.session import Session
from . import metrics
from .evaluate import FAST_THRESHOLD, WORLD
from .world import COLOURS, DIRECTION_UNITS, DIRECTIONS, ToyPrompt

POLICIES = ("cross", "recache", "recache_sink", "reset")
WINDOW = 3  # frames of a direction / speed window (one block)


# ------------------------------------------------------------------------------------------- helpers
def torus_distance(a: torch.Tensor, b: torch.Tensor, size: int = WORLD.size) -> torch.Tensor:
    """Distance between positions ``[..., 2]`` on the ``size`` torus."""
    d = (a - b + size / 2).remainder(size) - size / 2
    return d.norm(dim=-1)


def _window_slopes(xy: torch.Tensor, start: int) -> torch.Tensor:
    """Velocities fitted over every ``WINDOW``-frame window from frame ``start`` on: ``[B, W, 2]``."""
    t = torch.arange(WINDOW, dtype=xy.dtype) - (WINDOW - 1) / 2
    windows = xy[:, start:].unfold(1, WINDOW, 1)  # [B, W, 2, WINDOW]
    centred = windows - windows.mean(-1, keepdim=True)
    return (centred * t).sum(-1) / t.pow(2).sum()


def holds_from(ok: torch.Tensor) -> torch.Tensor:
    """``ok [B, N]`` (per frame or window) -> the first index from which every later entry is True ``[B]``
    (``inf`` when the last one is False)."""
    tail_ok = ok.flip(1).cumprod(1).flip(1).bool()  # tail_ok[:, j]: ok[:, j:] all True
    first = torch.where(tail_ok, torch.arange(ok.shape[1]), ok.shape[1])
    latency = first.min(1).values.float()
    return torch.where(latency >= ok.shape[1], torch.tensor(math.inf), latency)


def _summary(values: torch.Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    q = torch.tensor([0.5, 0.9])
    qs = torch.quantile(torch.where(torch.isfinite(values), values, torch.tensor(1e9)), q).tolist()
    return {"median": qs[0] if qs[0] < 1e9 else math.inf, "p90": qs[1] if qs[1] < 1e9 else math.inf,
            "never": float((~torch.isfinite(values)).float().mean()), "mean_finite": finite.mean().item()
            if len(finite) else math.inf}


# ---------------------------------------------------------------------------------------- switches
def switch_pairs(kind: str) -> list[tuple[str, str]]:
    """12 (from, to) prompt pairs changing one attribute: ``colour``, ``direction`` or ``speed``."""
    pairs = []
    for ci, colour in enumerate(COLOURS):
        for di, direction in enumerate(DIRECTIONS):
            if kind == "colour":
                pairs.append((f"{colour} fast {direction}", f"{COLOURS[(ci + 1) % 3]} fast {direction}"))
            elif kind == "direction":
                pairs.append((f"{colour} fast {direction}", f"{colour} fast {DIRECTIONS[(di + 1) % 4]}"))
            elif kind == "speed":  # half static -> fast, half fast -> static
                a, b = ("static", "fast") if (ci + di) % 2 == 0 else ("fast", "static")
                pairs.append((f"{colour} {a} {direction}", f"{colour} {b} {direction}"))
            else:
                raise ValueError(f"switch kind {kind!r} is not colour, direction or speed")
    return pairs


@dataclass
class SwitchClips:
    latents: torch.Tensor  # [N, F, 3, H, W]
    new_prompts: list[str]
    switch_frame: int


def run_switches(pipe, kind: str, policy: str, blend: int, *, before: int = 3, after: int = 4, repeats: int = 4,
                 seed: int = 0, pairs: int | None = None) -> SwitchClips:
    """``repeats`` streams per pair of :func:`switch_pairs` (``12 * repeats`` clips; the first ``pairs`` pairs when
    given): ``before`` blocks of the first prompt, then a switch with ``policy`` and ``blend`` blocks of blending,
    then ``after`` blocks."""
    clips, prompts = [], []
    for i, (first, second) in enumerate(switch_pairs(kind)[:pairs]):
        context = pipe.encode_prompts([first] * repeats)
        session = Session(pipe, context=context, seed=seed + 1000 * i, height=WORLD.size, width=WORLD.size,
                          decode=False)
        blocks = session.blocks(before)
        session.set_prompt(second, policy, blend)
        blocks += session.blocks(after)
        clips.append(torch.cat([b.latents.float().cpu() for b in blocks], 1))
        prompts += [second] * repeats
    return SwitchClips(torch.cat(clips), prompts, before * pipe.frames_per_block)


def switch_metrics(clips: SwitchClips, kind: str, *, continuity: bool = True) -> dict:
    """Latency of the switched attribute, the jump across the switch and the stability after it."""
    v, s, prompts = clips.latents, clips.switch_frame, clips.new_prompts
    parsed = [ToyPrompt.parse(p) for p in prompts]
    xy = metrics.positions(v)
    if kind == "colour":
        want = torch.tensor([COLOURS.index(p.colour) for p in parsed])
        ok = metrics.colour_index(v[:, s:]) == want[:, None]
    else:
        slopes = _window_slopes(xy, s)  # [N, W, 2]
        if kind == "direction":
            units = torch.tensor([DIRECTION_UNITS[p.direction] for p in parsed])
            all_units = torch.tensor([DIRECTION_UNITS[d] for d in DIRECTIONS])
            best = (slopes @ all_units.T).argmax(-1)
            ok = best == torch.tensor([DIRECTIONS.index(p.direction) for p in parsed])[:, None]
            ok &= (slopes * units[:, None]).sum(-1) > 0
        else:
            fast = torch.tensor([p.speed == "fast" for p in parsed])[:, None]
            ok = (slopes.norm(dim=-1) > FAST_THRESHOLD) == fast
    latency = holds_from(ok)
    out = {"clips": len(prompts), "latency_frames": _summary(latency),
           "within_2_blocks": float((latency <= 2 * WINDOW).float().mean()),
           "colour_accuracy_after": metrics.colour_accuracy(v[:, s:], prompts).mean().item(),
           "blobs_per_frame_after": metrics.blobs_per_frame(v[:, s:]).mean().item()}
    if continuity:
        v_old = metrics.fitted_velocity(xy[:, s - WINDOW:s])
        step = xy[:, s] - xy[:, s - 1]
        jump = segment_distance(step, v_old, prompt_velocity(parsed))
        from_old = (step - v_old).norm(dim=-1)  # positions are unwrapped: the step is the shortest way round
        out["jump_px"] = {"median": jump.median().item(), "p90": torch.quantile(jump, 0.9).item()}
        out["jump_from_old_motion_px"] = {"median": from_old.median().item(),
                                          "p90": torch.quantile(from_old, 0.9).item()}
    return out


def prompt_velocity(parsed: list[ToyPrompt]) -> torch.Tensor:
    """The data's velocity ``[B, 2]`` (pixels per frame) of static / fast prompts."""
    speed = torch.tensor([WORLD.fast_speed if p.speed == "fast" else 0.0 for p in parsed])
    return speed[:, None] * torch.tensor([DIRECTION_UNITS[p.direction] for p in parsed])


def segment_distance(step: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance ``[B]`` of the displacements ``step [B, 2]`` from the segments ``a -> b`` (both ``[B, 2]``)."""
    ab = b - a
    t = ((step - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-12)
    return (step - (a + t.clamp(0, 1)[:, None] * ab)).norm(dim=-1)


def switch_study(pipe, *, repeats: int = 4, blends: tuple[int, ...] = (0, 2), policies=POLICIES,
                 kinds=("colour", "direction", "speed"), pairs: int | None = None, progress: bool = False) -> dict:
    """Every policy x blend x switch kind: ``{policy: {blend: {kind: switch_metrics}}}``."""
    results = {}
    cells = [(policy, blend, kind) for policy in policies for blend in blends for kind in kinds]
    for policy, blend, kind in tqdm(cells, desc="switches", unit="setting", disable=not progress, file=sys.stderr):
        clips = run_switches(pipe, kind, policy, blend, repeats=repeats, pairs=pairs)
        results.setdefault(policy, {}).setdefault(str(blend), {})[kind] = switch_metrics(
            clips, kind, continuity=policy != "reset")
    return results


def switch_gates(results: dict) -> list[dict]:
    """The issue's gates: the new colour, direction and speed each within 2 blocks in >= 90 % of clips under every
    non-reset policy; cross and recache continuous (median jump <= 1 px) on every switch kind."""
    rows = []
    for policy, by_blend in results.items():
        for blend, by_kind in by_blend.items():
            if policy != "reset":
                for kind, m in by_kind.items():
                    value = m["within_2_blocks"]
                    rows.append({"gate": f"{policy} blend {blend}: new {kind} within 2 blocks", "value": value,
                                 "threshold": ">= 0.9", "pass": value >= 0.9})
            if policy in ("cross", "recache"):
                value = max(k["jump_px"]["median"] for k in by_kind.values())
                rows.append({"gate": f"{policy} blend {blend}: median jump across the switch (px, worst kind)",
                             "value": value, "threshold": "<= 1", "pass": value <= 1.0})
    return rows


# ----------------------------------------------------------------------------------- image and video start
def media_study(pipe, *, clips: int = 48, blocks: int = 3, seed: int = 0, progress: bool = False) -> dict:
    """Start from a rendered frame (blob at a known place) and continue a rendered fast clip, ``clips`` each.

    Image start: ``start_error_px`` is the first generated frame's distance from where the prompted motion takes
    the image's blob in one frame (the image is the frame before it), ``start_distance_px`` the plain distance from
    the image's blob (a perfect mover scores 0.75). Extension: the seam jump against the input's extrapolated
    motion, the speed of the first generated block (``seam_speed_ratio``) and of all ``blocks`` (``speed_ratio``)
    against the input's."""
    rng = torch.Generator().manual_seed(seed)
    prompts = [f"{c} fast {d}" for c in COLOURS for d in DIRECTIONS] * math.ceil(clips / 12)
    prompts = prompts[:clips]
    first_steps = prompt_velocity([ToyPrompt.parse(p) for p in prompts])  # the image is the frame before the first
    image_start, extension = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="start media", unit="clip", disable=not progress, file=sys.stderr)):
        frame, _ = WORLD.render([prompt.replace(" fast ", " static ")], 1, rng)  # [1, 1, 3, H, W]
        start_xy = metrics.positions(frame)[0, 0]
        session = Session(pipe, prompt, image=frame[0, 0], seed=seed + i, decode=False)
        v = torch.cat([b.latents.float().cpu() for b in session.blocks(blocks)], 1)
        xy = metrics.positions(v)[0]
        image_start.append({"start_error_px": torus_distance(xy[0], start_xy + first_steps[i]).item(),
                            "start_distance_px": torus_distance(xy[0], start_xy).item(),
                            "colour": metrics.colour_accuracy(v, [prompt]).item(),
                            "direction_ok": metrics.direction_correct(v, [prompt]).item(),
                            "speed": metrics.net_motion(v).item()})

        clip, _ = WORLD.render([prompt], 9, rng)  # the video to continue: 9 frames of fast motion
        session = Session(pipe, prompt, video=clip[0], seed=seed + i, decode=False)
        v = torch.cat([b.latents.float().cpu() for b in session.blocks(blocks)], 1)
        xy_in, xy_out = metrics.positions(clip)[0], metrics.positions(v)[0]
        velocity = metrics.fitted_velocity(xy_in[None])[0]
        seam_velocity = metrics.fitted_velocity(xy_out[None, :pipe.frames_per_block])[0]  # the first block's
        extension.append({"seam_jump_px": torus_distance(xy_out[0], xy_in[-1] + velocity).item(),
                          "seam_speed_ratio": (seam_velocity.norm() / velocity.norm()).item(),
                          "speed_ratio": metrics.net_motion(v).item() / metrics.net_motion(clip).item(),
                          "colour": metrics.colour_accuracy(v, [prompt]).item(),
                          "direction_ok": metrics.direction_correct(v, [prompt]).item()})

    def agg(rows, key):
        values = [r[key] for r in rows]
        return {"median": statistics.median(values), "p90": sorted(values)[int(0.9 * (len(values) - 1))],
                "mean": statistics.fmean(values)}

    return {"clips": clips,
            "image_start": {"start_error_px": agg(image_start, "start_error_px"),
                            "start_distance_px": agg(image_start, "start_distance_px"),
                            "colour_accuracy": statistics.fmean(r["colour"] for r in image_start),
                            "direction_accuracy": statistics.fmean(r["direction_ok"] for r in image_start),
                            "speed": agg(image_start, "speed"), "data_speed": WORLD.fast_speed},
            "extension": {"seam_jump_px": agg(extension, "seam_jump_px"),
                          "seam_speed_ratio": agg(extension, "seam_speed_ratio"),
                          "speed_ratio": agg(extension, "speed_ratio"),
                          "colour_accuracy": statistics.fmean(r["colour"] for r in extension),
                          "direction_accuracy": statistics.fmean(r["direction_ok"] for r in extension)}}


def media_gates(results: dict) -> list[dict]:
    i, e = results["image_start"], results["extension"]
    speed = i["speed"]["median"] / i["data_speed"]
    rows = [("image start: median distance of the first frame's blob from the image's moved one frame as "
             "prompted (px)",
             i["start_error_px"]["median"], "<= 1", i["start_error_px"]["median"] <= 1),
            ("image start: colour accuracy", i["colour_accuracy"], ">= 0.9", i["colour_accuracy"] >= 0.9),
            ("image start: direction accuracy", i["direction_accuracy"], ">= 0.9", i["direction_accuracy"] >= 0.9),
            ("image start: median speed / data speed", speed, "0.8 - 1.2", 0.8 <= speed <= 1.2),
            ("extension: median seam jump (px)", e["seam_jump_px"]["median"], "<= 1", e["seam_jump_px"]["median"] <= 1),
            ("extension: median speed ratio at the seam (first block) to the input", e["seam_speed_ratio"]["median"],
             "0.8 - 1.2", 0.8 <= e["seam_speed_ratio"]["median"] <= 1.2),
            ("extension: colour accuracy", e["colour_accuracy"], ">= 0.9", e["colour_accuracy"] >= 0.9),
            ("extension: direction accuracy", e["direction_accuracy"], ">= 0.9", e["direction_accuracy"] >= 0.9)]
    return [{"gate": g, "value": v, "threshold": t, "pass": bool(ok)} for g, v, t, ok in rows]


# ------------------------------------------------------------------------------------------ speed levers
def time_block_loop(pipe, prompts: list[str], *, num_frames: int = 21, repeats: int = 3) -> float:
    """Median seconds per block of ``pipe.generate`` on ``prompts`` (one batch, no decode)."""
    pipe.generate(prompts, num_frames=num_frames, height=WORLD.size, width=WORLD.size, decode=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.generate(prompts, num_frames=num_frames, height=WORLD.size, width=WORLD.size, decode=False)
        times.append((time.perf_counter() - start) / (num_frames // pipe.frames_per_block))
    return statistics.median(times)
