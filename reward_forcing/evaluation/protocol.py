"""Evaluation protocols (``configs/eval/*.yaml``): which prompts, how to generate, how to score.

A protocol file fills ``EvalProtocol``; ``key=value`` overrides (``prompts.limit=50``) are merged on top, and
unknown keys or bad values fail with the key and the file named. ``generation_command`` turns a protocol into the
``inference.py`` command line (under ``torch.distributed.run`` for several processes), and ``scoring_options``
into the settings of the scorer. The student's block layout for the seam metric is derived from the generation
config (``causal.frames_per_block``), so the two cannot disagree.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reward_forcing.data import read_lines

from .metrics import MetricConfig
from .runner import ScoringOptions

__all__ = ["PromptSpec", "GenerationSpec", "ScoringSpec", "EvalProtocol", "ProtocolError", "load_protocol",
           "prepare_prompts", "generation_command", "block_layout", "scoring_options"]

FETCH_HINT = "fetch the benchmark lists with `python scripts/fetch_prompts.py`"


class ProtocolError(ValueError):
    """A protocol file or value is missing or invalid; the message names the key and the fix."""


@dataclass
class PromptSpec:
    file: str = MISSING  # short prompts, one per line; they name the videos
    extended: Optional[str] = None  # LLM-extended prompts, same line count; the model is conditioned on these
    limit: int = 0  # use only the first N prompts (0 = all)


@dataclass
class GenerationSpec:
    config: str = "configs/reward_forcing.yaml"  # model config passed to inference.py
    num_output_frames: int = 21  # latent frames: 21 -> 81 video frames, 120 -> 477
    height: int = 480
    width: int = 832
    num_samples: int = 1  # videos per prompt
    seed: int = 0  # prompt i, sample s uses seed + i * num_samples + s (inference.py)
    use_ema: bool = False
    overrides: list[str] = field(default_factory=list)  # extra config key=value for inference.py


@dataclass
class ScoringSpec:
    window_frames: int = 16
    flow_short_side: int = 256
    video_reward: str = "auto"  # auto | on | off
    reward_prompt: str = "extended"  # extended | short: the text VideoReward judges alignment against
    reward_batch_size: int = 4
    vbench_dimensions: list[str] = field(default_factory=list)  # used only when `vbench` is installed


@dataclass
class EvalProtocol:
    name: str = MISSING
    description: str = ""
    prompts: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)


def load_protocol(path: str | os.PathLike, overrides: list[str] | None = None) -> EvalProtocol:
    """Schema defaults <- protocol YAML <- ``key=value`` overrides, validated."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"protocol file '{path}' does not exist (configs/eval/ has vbench_5s.yaml and "
                            f"long_30s.yaml)")
    source = str(path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvalProtocol), OmegaConf.load(path))
        if overrides:
            source += f" + overrides {overrides}"
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        protocol: EvalProtocol = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ProtocolError(f"{source}: bad protocol key {key!r}: {str(err).splitlines()[0]}") from None
    _validate(protocol, source)
    return protocol


def _validate(p: EvalProtocol, source: str) -> None:
    def fail(key: str, msg: str):
        raise ProtocolError(f"{source}: {key}: {msg}")

    g, s = p.generation, p.scoring
    if p.prompts.limit < 0:
        fail("prompts.limit", f"must be >= 0 (0 = all prompts), got {p.prompts.limit}")
    for key in ("num_output_frames", "num_samples", "height", "width"):
        if getattr(g, key) < 1:
            fail(f"generation.{key}", f"must be >= 1, got {getattr(g, key)}")
    if g.seed < 0:
        fail("generation.seed", f"must be >= 0, got {g.seed}")
    if s.video_reward not in ("auto", "on", "off"):
        fail("scoring.video_reward", f"{s.video_reward!r} is not auto, on or off")
    if s.reward_prompt not in ("extended", "short"):
        fail("scoring.reward_prompt", f"{s.reward_prompt!r} is not extended or short")
    if s.reward_batch_size < 1:
        fail("scoring.reward_batch_size", f"must be >= 1, got {s.reward_batch_size}")
    try:
        MetricConfig(window_frames=s.window_frames, flow_short_side=s.flow_short_side).validate()
    except ValueError as err:
        fail("scoring", str(err))


def prepare_prompts(protocol: EvalProtocol, work_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """The prompt file(s) to generate from: the protocol's, or their first ``limit`` lines written to
    ``work_dir`` (line numbers, and so video names, stay those of the full list)."""
    spec = protocol.prompts
    files = [Path(spec.file)] + ([Path(spec.extended)] if spec.extended else [])
    for f in files:
        if not f.is_file():
            raise ProtocolError(f"prompt list '{f}' of protocol '{protocol.name}' is missing; {FETCH_HINT} "
                                f"(or set prompts.file / prompts.extended)")
    if not spec.limit:
        return files[0], (files[1] if len(files) > 1 else None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        target = work_dir / f.name
        target.write_text("".join(line + "\n" for line in read_lines(f)[:spec.limit]), encoding="utf-8")
        written.append(target)
    return written[0], (written[1] if len(written) > 1 else None)


def generation_command(protocol: EvalProtocol, *, inference_script: str | os.PathLike, prompt_file: Path,
                       extended_file: Path | None, output_folder: str | os.PathLike,
                       checkpoint_path: str | None = None, nproc_per_node: int = 1,
                       python: str = sys.executable) -> list[str]:
    """The ``inference.py`` command that generates the protocol's videos (``torch.distributed.run`` when
    ``nproc_per_node > 1``; inference.py splits the prompts over the ranks)."""
    g = protocol.generation
    if nproc_per_node < 1:
        raise ProtocolError(f"--nproc_per_node must be >= 1, got {nproc_per_node}")
    launcher = [python] if nproc_per_node == 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    cmd = launcher + [str(inference_script), "--config_path", g.config, "--data_path", str(prompt_file),
                      "--output_folder", str(output_folder), "--num_output_frames", str(g.num_output_frames),
                      "--num_samples", str(g.num_samples), "--seed", str(g.seed)]
    if extended_file is not None:
        cmd += ["--extended_prompt_path", str(extended_file)]
    if checkpoint_path:
        cmd += ["--checkpoint_path", str(checkpoint_path)]
    if g.use_ema:
        cmd.append("--use_ema")
    return cmd + [f"video.height={g.height}", f"video.width={g.width}", *g.overrides]


def block_layout(frames_per_block: int, vae_temporal_stride: int = 4) -> tuple[int, int]:
    """Decoded frames of the first block and of every later block for ``frames_per_block`` latent frames: the
    Wan VAE decodes the first latent frame to 1 frame and each later one to ``vae_temporal_stride`` (4), so
    3-frame blocks give (9, 12)."""
    return 1 + vae_temporal_stride * (frames_per_block - 1), vae_temporal_stride * frames_per_block


def scoring_options(protocol: EvalProtocol, *, device: str = "auto", extra_overrides: list[str] | None = None
                    ) -> ScoringOptions:
    """Scorer settings of a protocol: its windows and reward options, the block layout and reward model of its
    generation config."""
    from reward_forcing.config import ConfigError, load_config

    g, s = protocol.generation, protocol.scoring
    overrides = list(g.overrides) + list(extra_overrides or [])
    try:
        model_cfg = load_config(g.config, overrides)
    except ConfigError as err:
        raise ProtocolError(f"generation.config: {err}") from None
    first, block = block_layout(model_cfg.causal.frames_per_block)
    metrics = MetricConfig(first_block_frames=first, block_frames=block, window_frames=s.window_frames,
                           flow_short_side=s.flow_short_side)
    return ScoringOptions(metrics=metrics, video_reward=s.video_reward, reward_config=g.config,
                          reward_overrides=overrides, reward_prompt=s.reward_prompt,
                          reward_batch_size=s.reward_batch_size, device=device,
                          vbench_dimensions=list(s.vbench_dimensions))
