"""Typed configuration: OmegaConf YAML over a dataclass schema.

``load_config("configs/X.yaml", ["causal.sink_policy=static", ...])`` merges, in order, the schema defaults,
the YAML file and dotlist overrides. The schema defaults *are* ``configs/default.yaml`` (a test keeps the two
identical), and they reproduce the reference release. An unknown key, a value of the wrong type or an invalid
value fails with a :class:`ConfigError` naming the key and the file it came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401  (MISSING re-exported for schemas)
from omegaconf.errors import OmegaConfBaseException

from .compile import COMPILE_FALLBACKS, COMPILE_MODES
from .models.kv_cache import CausalSpec
from .models.wan import WAN_FLAVORS
from .quantize import QUANTIZE_MODES
from .schedule import NUM_TRAIN_TIMESTEPS
from .streaming import StreamSettings

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or invalid."""


@dataclass
class ModelConfig:
    generator: str = "1.3B"  # causal student flavor: tiny | toy | 1.3B | 14B
    critic: str = "1.3B"  # fake score
    teacher: str = "14B"  # real score
    text_encoder: str = "umt5-xxl"  # umt5-xxl | tiny | toy (the toy world's word table)
    vae: str = "wan2.1"  # wan2.1 | tiny | identity (a world that lives in latent space, e.g. the toy world)
    # The reward Re-DMD weights by (training only; unused when training.beta = 0): videoreward | tiny |
    # toy_motion (net motion of a toy-world video). training.reward_key picks which of its scores.
    reward: str = "videoreward"
    random_init: bool = False  # build random weights instead of loading checkpoints (tiny debug runs)
    # Generator weights for inference.py and the live app when --checkpoint_path is not given ('': the released
    # checkpoint under checkpoint_root). Set in a config file, a relative path is from that file's folder (a config
    # that ships its weights, e.g. configs/toy/student.yaml, works from any directory); as a command-line
    # override it is from the working directory, like every other path here.
    checkpoint: str = ""
    use_ema: bool = False  # load its generator_ema (as --use_ema does; configs/community/ set what each release needs)
    # A LoRA file merged into the generator weights at load (peft keys, e.g. LongLive's lora.pt; its generator_lora
    # when the file holds several), scaled by lora_scale (= its alpha / rank). A relative path is resolved like
    # model.checkpoint's.
    lora: str = ""
    lora_scale: float = 1.0
    gradient_checkpointing: bool = True
    rope_precision: str = "float64"  # float64 (reference numerics) | float32 (faster on GPU, ~1e-6 apart)
    # Inference: weight quantization of the generator's transformer layers (quantize.py, optimum-quanto): none |
    # int8 | fp8 (weights only, on CPUs and GPUs)
    quantize: str = "none"
    compile: bool = False  # torch.compile the generator's blocks for inference (one graph for all layers)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    compile_fallback: str = "error"  # error: a failed compile stops the run | eager: warn and run eager
    # Inference under torchrun: split the generator's layers across the ranks (pipeline_parallel.py) instead of
    # splitting the prompts; the batch goes through the stages in pipeline_micro_batches parts.
    pipeline_parallel: bool = False
    pipeline_micro_batches: int = 1


_STREAM = StreamSettings()  # the block loop's defaults live there, once


@dataclass
class ScheduleConfig:
    timestep_shift: float = _STREAM.timestep_shift
    denoising_step_list: list[float] = field(default_factory=lambda: list(_STREAM.denoising_steps))
    warp_denoising_step: bool = _STREAM.warp  # map the list through the shifted grid: [1000, 937.5, 833.33, 625]
    context_noise: float = _STREAM.context_noise  # timestep of the cache-writing context pass after each block
    # Inference only: false skips that pass (4 forwards per block instead of 5) and the cache keeps the last denoising
    # step's keys/values. Training rollouts always run it. Measured in docs/toy_world.md ("Speed levers").
    context_pass: bool = _STREAM.context_pass


@dataclass
class VideoConfig:
    height: int = _STREAM.height  # pixels
    width: int = _STREAM.width
    num_output_frames: int = 21  # latent frames (21 -> 81 video frames)
    fps: int = 16
    # Written videos and the live app's frames are enlarged this many times, nearest neighbour (the toy world's
    # 8x8 frames: 32 -> 256x256). Generation is unchanged.
    display_scale: int = 1


@dataclass
class TextConfig:
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # used by the teacher's CFG in training
    offload_text_encoder: bool = _STREAM.offload_text_encoder  # UMT5 parked on the CPU, on the GPU only to encode
    # Where the text encoder runs: '' = the generator's device; 'cpu' keeps umt5-xxl (11.4 GB in bf16) off the GPU
    # altogether, at seconds per prompt (16 GB cards: docs/memory.md)
    encoder_device: str = ""
    start_prompt: str = ""  # the web app's first prompt ('': the page's sample scene); a toy config needs its own


# The transformer layers' linear maps (attention q/k/v/o, self and cross, and the FFN), as peft matches module names
LORA_TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]


@dataclass
class LoraSettings:
    """Low-rank adapters instead of full fine-tuning (training/lora.py, with peft): the trained DiT's weights are
    frozen (in bf16 on a GPU) and only ``rank``-dimensional adapters on ``targets`` train; every export merges them
    into plain weights, so inference loads the result like any other checkpoint."""

    rank: int = 0  # 0: off (full fine-tuning, the reference)
    alpha: float = 0.0  # adapter scale alpha / rank; 0 means alpha = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module-name suffixes (peft)
    critic: bool = False  # dmd: the critic trains adapters too (else it is fully fine-tuned)


@dataclass
class TrainingConfig:
    """Re-DMD settings of the reference run (docs/differences.md lists where training departs from it).

    ``mode`` picks what is trained: ``dmd`` (Re-DMD of the causal student; plain DMD with beta = 0), ``ode``
    (regress the causal student onto teacher ODE pairs from scripts/generate_ode_pairs.py: the ODE init) or
    ``teacher`` (flow matching of the bidirectional teacher on latent videos, with CFG dropout).
    """

    mode: str = "dmd"  # dmd | ode | teacher

    generator_ckpt: str = "checkpoints/ode_init.pt"
    # Weights of the teacher / critic when they are not the flavor's base weights (e.g. a trained toy teacher;
    # DMD's critic then starts as a copy of the teacher). Empty: the base weights of model.teacher / model.critic.
    teacher_ckpt: str = ""
    critic_ckpt: str = ""
    latent_data: str = ""  # teacher mode: 'toy' (the toy world, drawn on the fly) or a folder of latent .pt files
    toy_any_fast: float = 0.5  # latent_data=toy: probability that an `any` clip is fast (the Re-DMD positive control)
    ode_pairs_path: str = ""  # ode mode: the .pt file written by scripts/generate_ode_pairs.py
    # ode mode: each sample's first k blocks (k uniform in 0..blocks-1) are given clean, at t = 0, as context -
    # what the inference cache holds - instead of their noisy ODE states, and carry no loss. False is the
    # reference: every block at a noisy state, so the student never sees the clean context it streams on.
    ode_clean_context: bool = False
    cfg_dropout: float = 0.1  # teacher mode: probability of training a sample on the negative prompt (for CFG)
    data_path: str = "prompts/vidprom_filtered_extended.txt"
    lr: float = 2e-6
    lr_critic: float = 4e-7
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    lr_cooldown_steps: int = 0  # the last N steps decay the learning rates linearly to 0 (0: constant, as the reference)
    max_grad_norm_generator: float = 10.0
    max_grad_norm_critic: float = 10.0
    batch_size: int = 1  # per GPU and micro-batch
    global_batch_size: int = 0  # if > 0: prompts per optimizer step over all ranks; sets batch_size per GPU
    gradient_accumulation_steps: int = 8
    dfake_gen_update_ratio: int = 5
    max_steps: int = 601
    ema_weight: float = 0.99
    ema_start_step: int = 200
    beta: float = 2.0  # reward temperature: weight exp(beta * reward)
    # Reward-tilted critic (not in the reference; docs/differences.md): the critic's per-sample flow-matching loss is
    # weighted by exp(-critic_tilt_beta * reward) / batch mean, which moves DMD's fixed point from the teacher to
    # p_teacher * exp(critic_tilt_beta * reward). 0 = off (the reference's unweighted critic). Combines with beta.
    critic_tilt_beta: float = 0.0
    reward_key: str = "MQ"  # the reward's score that weights samples (VideoReward: VQ | MQ | TA; toy: motion)
    guidance_scale: float = 3.0  # teacher CFG
    num_training_frames: int = 21
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    mixed_precision: bool = True  # bf16 compute on GPU (FSDP2 policy, or autocast for one process)
    seed: int = 0  # used as given (+ rank); the reference's seed 0 meant "random"
    log_every: int = 1
    save_every: int = 100  # steps between resumable checkpoints (the reference never saved)
    # Resumable checkpoints kept (~40 GB each for the 1.3B run); older ones are deleted after each save.
    # null keeps all. The reference-format exports checkpoint_model_N/model.pt are always kept.
    keep_last_checkpoints: Optional[int] = 2
    sample_every: int = 0  # steps between sample videos logged to wandb (0 = off)
    # Deliberate fixes of the reference, each with the switch that restores it (docs/differences.md).
    reward_weighting: str = "per_sample"  # per_sample | first_sample (reference: sample 0 weights the batch)
    reward_pixel_range: str = "unit"  # unit ([0, 1] as VideoReward was trained) | reference (255 * [-1, 1])
    reward_sample_all_frames: bool = False  # reference: all 81 frames; default: VideoReward's 2 fps sampling
    reward_fps: float = 2.0
    rollout_sink_policy: str = "static"  # static = the reference's never-updated training sink | ema | none
    reference_context_noise: bool = False  # reference: t=0 snaps to sigma 0.00498 of fresh noise in training
    score_timestep_shift: float = 8.0  # grid of the teacher/critic x0 <-> flow conversions (reference: 8)
    critic_flow_from_x0: bool = False  # reference: critic flow = (x_t - x0)/sigma on the shift-5 grid
    wandb_project: str = "reward-forcing"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class Config:
    checkpoint_root: str = "checkpoints"  # folder laid out as download_checkpoints.sh writes it
    model: ModelConfig = field(default_factory=ModelConfig)
    causal: CausalSpec = field(default_factory=CausalSpec)  # the student's attention pattern (models/kv_cache.py)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


TRAINING_MODES = ("dmd", "ode", "teacher")


def _validate(cfg: Config, source: str) -> None:
    def fail(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")

    # The text encoder, decoder and reward are checked by their registries in build.py (the config cannot see
    # what is registered there); the decoder also owns the video geometry (build_pipeline checks the size first).
    for key in ("generator", "critic", "teacher"):
        if getattr(cfg.model, key) not in WAN_FLAVORS:
            fail(f"model.{key}", f"{getattr(cfg.model, key)!r} is not one of {tuple(WAN_FLAVORS)}")
    if cfg.text.encoder_device not in ("", "cpu"):
        fail("text.encoder_device", f"{cfg.text.encoder_device!r} is not '' (the generator's device) or 'cpu'")
    if cfg.model.quantize not in QUANTIZE_MODES:
        fail("model.quantize", f"{cfg.model.quantize!r} is not one of {QUANTIZE_MODES}")
    if cfg.model.rope_precision not in ("float64", "float32"):
        fail("model.rope_precision", f"{cfg.model.rope_precision!r} is not 'float64' or 'float32'")
    if cfg.model.compile_mode not in COMPILE_MODES:
        fail("model.compile_mode", f"{cfg.model.compile_mode!r} is not one of {COMPILE_MODES}")
    if cfg.model.pipeline_micro_batches < 1:
        fail("model.pipeline_micro_batches", f"{cfg.model.pipeline_micro_batches} must be >= 1")
    if cfg.model.compile_fallback not in COMPILE_FALLBACKS:
        fail("model.compile_fallback", f"{cfg.model.compile_fallback!r} is not one of {COMPILE_FALLBACKS}")
    if cfg.video.num_output_frames < 1 or cfg.video.num_output_frames % cfg.causal.frames_per_block:
        fail("video.num_output_frames", f"{cfg.video.num_output_frames} latent frames is not a positive multiple "
             f"of causal.frames_per_block={cfg.causal.frames_per_block} (e.g. 21 for 81 video frames)")
    if cfg.video.fps < 1:
        fail("video.fps", f"must be >= 1, got {cfg.video.fps}")
    if not 1 <= cfg.video.display_scale <= 64:
        fail("video.display_scale", f"must be an integer in [1, 64], got {cfg.video.display_scale}")
    tr = cfg.training
    if tr.mode not in TRAINING_MODES:
        fail("training.mode", f"{tr.mode!r} is not one of {TRAINING_MODES}")
    if not 0 <= tr.toy_any_fast <= 1:
        fail("training.toy_any_fast", f"must be a probability in [0, 1], got {tr.toy_any_fast}")
    if not 0 <= tr.cfg_dropout < 1:
        fail("training.cfg_dropout", f"must be in [0, 1), got {tr.cfg_dropout}")
    if tr.reward_weighting not in ("per_sample", "first_sample"):
        fail("training.reward_weighting", f"{tr.reward_weighting!r} is not 'per_sample' or 'first_sample'")
    if tr.reward_pixel_range not in ("unit", "reference"):
        fail("training.reward_pixel_range", f"{tr.reward_pixel_range!r} is not 'unit' or 'reference'")
    try:
        cfg.causal.with_policy(tr.rollout_sink_policy)  # CausalSpec validates sink policies
    except ValueError as err:
        fail("training.rollout_sink_policy", str(err))
    _validate_training(tr, NUM_TRAIN_TIMESTEPS, fail)
    if tr.num_training_frames % cfg.causal.frames_per_block:
        fail("training.num_training_frames", f"{tr.num_training_frames} is not a multiple of "
             f"causal.frames_per_block={cfg.causal.frames_per_block}")
    for step in cfg.schedule.denoising_step_list:
        if not 0 < step <= NUM_TRAIN_TIMESTEPS:
            fail("schedule.denoising_step_list", f"step {step} outside (0, {NUM_TRAIN_TIMESTEPS}]")


def _validate_training(tr: TrainingConfig, num_train_timesteps: int, fail) -> None:
    """Values a run would crash on (or silently misbehave with) many steps in, caught at load time."""
    for f in fields(tr):
        value = getattr(tr, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"training.{f.name}", f"must be a finite number, got {value}")
    at_least = {"batch_size": 1, "gradient_accumulation_steps": 1, "dfake_gen_update_ratio": 1, "max_steps": 1,
                "save_every": 1, "log_every": 1, "num_training_frames": 1, "global_batch_size": 0,
                "sample_every": 0, "ema_start_step": 0, "seed": 0, "lr_cooldown_steps": 0}
    for key, low in at_least.items():
        if getattr(tr, key) < low:
            fail(f"training.{key}", f"must be >= {low}, got {getattr(tr, key)}")
    if tr.keep_last_checkpoints is not None and tr.keep_last_checkpoints < 1:
        fail("training.keep_last_checkpoints", f"must be >= 1 (or null to keep every checkpoint), "
             f"got {tr.keep_last_checkpoints}")
    for key in ("lr", "lr_critic", "max_grad_norm_generator", "max_grad_norm_critic", "reward_fps",
                "score_timestep_shift"):
        if getattr(tr, key) <= 0:
            fail(f"training.{key}", f"must be > 0, got {getattr(tr, key)}")
    if tr.weight_decay < 0:
        fail("training.weight_decay", f"must be >= 0, got {tr.weight_decay}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(tr, key) < 1:
            fail(f"training.{key}", f"must be in [0, 1), got {getattr(tr, key)}")
    if not 0 <= tr.ema_weight <= 1:
        fail("training.ema_weight", f"must be in [0, 1], got {tr.ema_weight}")
    if tr.lora.rank < 0 or tr.lora.alpha < 0:
        fail("training.lora", f"rank and alpha must be >= 0 (rank 0: no adapters), got rank {tr.lora.rank} and "
             f"alpha {tr.lora.alpha}")
    if tr.lora.rank and not tr.lora.targets:
        fail("training.lora.targets", f"is empty; name the linear layers to adapt, e.g. {LORA_TARGETS}")
    if not 0 <= tr.min_timestep < tr.max_timestep <= num_train_timesteps:
        fail("training.min_timestep", f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}, got "
             f"{tr.min_timestep} and {tr.max_timestep}")


def _merge(base: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        first = str(err).splitlines()[0]
        raise ConfigError(f"{source}: bad config key {key!r}: {first}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file <- ``key=value`` overrides; returns a validated :class:`Config`."""
    cfg = OmegaConf.structured(Config)
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (configs/ has default.yaml, "
                              "reward_forcing.yaml, tiny.yaml)")
        source = str(path)
        file_cfg = OmegaConf.load(path)
        for key in ("checkpoint", "lora"):  # weights a config names are found from any working directory
            weights = OmegaConf.select(file_cfg, f"model.{key}", default=None)
            if weights and not Path(weights).is_absolute():
                file_cfg.model[key] = str(path.parent / weights)
        cfg = _merge(cfg, file_cfg, source)
    if overrides:
        source = f"{source} + overrides {overrides}"
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad override in {overrides}: {str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, "command-line overrides")
    try:  # the causal section is a CausalSpec, which validates itself; its messages start with the field name
        OmegaConf.to_object(cfg.causal)
    except ValueError as err:
        raise ConfigError(f"{source}: causal.{err}") from None
    obj: Config = OmegaConf.to_object(cfg)
    _validate(obj, source)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
