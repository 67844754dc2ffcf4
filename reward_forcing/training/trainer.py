"""Training: Re-DMD (alternating critic and generator updates with reward-weighted DMD), and the two stages
before it, selected by ``training.mode``: ``ode`` regresses the causal student onto teacher ODE pairs (the ODE
init), ``teacher`` trains the bidirectional teacher by flow matching with CFG dropout. All three share this
loop: accumulation, divergence checks, logging, resumable checkpoints and exports.

One **step** is one critic optimizer step; every ``dfake_gen_update_ratio`` steps the generator also takes one
(the generator update comes first, as in the reference). Each optimizer step accumulates
``gradient_accumulation_steps`` micro-batches and steps **once** - the textbook accumulation the reference meant
(docs/differences.md describes its double steps and compares the compute budgets). Generator EMA starts at
``ema_start_step`` and follows every generator step. Checkpoints are resumable (models, optimizers, EMA, step,
RNG, data position) and atomic; each one is also exported in the reference format
``{generator, critic, generator_ema}``.

Generator loss (per sample i): ``0.5 * exp(beta * MQ_i) * mse(x_i, sg(x_i - g_i))`` where ``x`` is the student's
self-forcing rollout, ``g`` the normalised DMD gradient ``(x0_fake - x0_real) / mean|x - x0_real|`` with the
teacher under CFG (scale 3) and the critic without, and ``MQ_i`` the normalised motion-quality reward of the
decoded video. Critic loss: flow matching on fresh no-grad rollouts; with ``training.critic_tilt_beta`` each
rollout's loss is weighted by the self-normalised ``exp(-critic_tilt_beta * reward_i)`` of its own decoded video
(the reward-tilted critic, ``losses.critic_tilt_weights``), which costs one decode and one reward call per critic
step.

The text encoder, the decoder and the reward are whatever the config builds (``training/build.py``): the
trainer calls ``text_encoder(prompts)`` / ``encode_negative``, ``vae.decode`` / ``vae.latent_size`` and
``reward.score(pixels, prompts) -> {name: [B]}``, weighting by the score ``training.reward_key`` - VideoReward's
MQ for the real recipe, net motion in the toy world.

ODE mode: each sample takes, per block, the trajectory's state at a random one of the student's timesteps, and
the student (block-causal, one forward over the whole video) regresses its x0 prediction onto the teacher's
clean sample; with ``training.ode_clean_context`` a random prefix of blocks is instead the clean sample at t = 0
(the context the inference cache holds), seen by the blocks after it and not trained. Teacher mode:
``mse(v(x_t, t, c), noise - x0)``, with the condition replaced by the negative prompt's embedding for a
``cfg_dropout`` fraction of samples.

Run folder (``logdir``): ``log.jsonl`` (one line per step), ``checkpoints/step_N`` (resumable, the last
``keep_last_checkpoints`` kept), ``checkpoint_model_N/model.pt`` (exports: the reference trainer format for
dmd, ``{"generator"}`` like ``ode_init.pt`` for ode, ``{"model"}`` for teacher; all load with
``load_generator_state_dict``), ``samples/``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import checkpoints as ckpt
from ..config import Config
from ..data import LatentVideos, PromptSampler, latent_videos, ode_pairs
from ..models.wan import WanModel
from ..schedule import FlowMatchSchedule, sample_training_timesteps
from ..video_io import Mp4Writer
from . import checkpointing, parallel
from .build import TrainingModels
from .ema import ShardedEMA
from .lora import lora_scaling
from .losses import (critic_loss, critic_tilt_weights, dmd_gradient, flow_matching_loss, ode_regression_inputs,
                     ode_regression_loss, re_dmd_loss, reference_critic_flow)
from .rollout import RolloutConfig, rollout
from .run import (CHECKPOINT_DIR, EXPORT_PREFIX, SAMPLE_DIR, RunLog, StepLog, is_generator_step, lr_factor,
                  per_rank_batch_size, training_budget)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; raised before the optimizer step, so no weight is touched."""


class Trainer:
    def __init__(self, cfg: Config, models: TrainingModels, prompts: list[str], logdir: str | Path, *,
                 dist: parallel.DistInfo, use_wandb: bool = False, resume: bool = False):
        self.cfg, self.tr, self.m, self.dist = cfg, cfg.training, models, dist
        self.device = dist.device
        self.logdir = Path(logdir)
        self.ckpt_dir = self.logdir / CHECKPOINT_DIR
        if dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_leftovers(self.ckpt_dir)
        parallel.barrier()

        self.mode = self.tr.mode
        self.batch_size = per_rank_batch_size(self.tr, dist.world_size)
        parallel.seed_everything(self.tr.seed, dist.rank)
        self.videos: LatentVideos | None = None  # what teacher / ode mode train on; dmd trains on prompts
        if self.mode == "teacher":
            self.videos = latent_videos(self.tr.latent_data, num_frames=self.tr.num_training_frames,
                                        seed=self.tr.seed + dist.rank, toy_any_fast=self.tr.toy_any_fast)
        elif self.mode == "ode":
            self.videos = ode_pairs(self.tr.ode_pairs_path)
        items = prompts if self.videos is None else self.videos.items
        self.sampler = PromptSampler(items, rank=dist.rank, world_size=dist.world_size, seed=self.tr.seed)
        self.schedule = FlowMatchSchedule(cfg.schedule.timestep_shift)
        self.score_schedule = FlowMatchSchedule(self.tr.score_timestep_shift)
        self.rollout_cfg = RolloutConfig(
            timesteps=self.schedule.denoising_timesteps(cfg.schedule.denoising_step_list,
                                                        cfg.schedule.warp_denoising_step),
            context_noise=cfg.schedule.context_noise, reference_context_noise=self.tr.reference_context_noise,
            sink_policy=self.tr.rollout_sink_policy)

        # What trains in each mode: name -> (model, learning rate, gradient-norm clip)
        trained = {"dmd": {"generator": (models.generator, self.tr.lr, self.tr.max_grad_norm_generator),
                           "critic": (models.critic, self.tr.lr_critic, self.tr.max_grad_norm_critic)},
                   "ode": {"generator": (models.generator, self.tr.lr, self.tr.max_grad_norm_generator)},
                   "teacher": {"teacher": (models.teacher, self.tr.lr, self.tr.max_grad_norm_generator)}}[self.mode]
        for model in (models.teacher, models.text_encoder, models.vae, models.reward):
            if model is not None and model not in [m for m, _, _ in trained.values()]:
                model.requires_grad_(False).eval()
        betas = (self.tr.beta1, self.tr.beta2)
        self.models: dict[str, WanModel] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.max_norms: dict[str, float] = {}
        self.base_lrs: dict[str, float] = {}
        for name, (model, lr, max_norm) in trained.items():
            model.train().enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
            self.models[name] = model
            # only what trains (with training.lora: the adapters), so no moments are kept for frozen weights
            self.optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                      lr=lr, betas=betas,
                                                      weight_decay=self.tr.weight_decay)
            self.max_norms[name] = max_norm
            self.base_lrs[name] = lr
        self.ema: ShardedEMA | None = None
        self.step = 0
        # One process on a GPU: autocast gives the bf16 compute FSDP2's policy gives several processes.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=self.tr.mixed_precision and self.device.type == "cuda"
                                       and dist.world_size == 1)
        self.compute_dtype = (torch.bfloat16 if self.tr.mixed_precision and self.device.type == "cuda"
                              else torch.float32)
        self.run_log = RunLog(self.logdir, self.tr, is_main=dist.is_main, use_wandb=use_wandb)
        self._last_sample: tuple[torch.Tensor, str] | None = None
        if resume:
            self.resume()

    # ------------------------------------------------------------------------------------ data
    def _next_batch(self):
        """A micro-batch: prompts (dmd), or ``(latents, prompts)`` of latent videos / ODE trajectories."""
        items = [next(self.sampler) for _ in range(self.batch_size)]
        if self.videos is None:
            return items
        latents, prompts = self.videos.get(items)
        return latents.to(self.device), prompts

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and negative-prompt text embeddings on the training device."""
        te = self.m.text_encoder
        cond = te(prompts).to(self.device)
        uncond = te.encode_negative(self.cfg.text.negative_prompt, len(prompts)).to(self.device)
        return cond, uncond

    def _noise(self, batch: int) -> torch.Tensor:
        g = self.m.generator.config
        h, w = self.m.vae.latent_size(self.cfg.video.height, self.cfg.video.width)
        return torch.randn(batch, self.tr.num_training_frames, g.in_dim, h, w, device=self.device)

    def _rollout(self, cond: torch.Tensor, *, grad: bool) -> torch.Tensor:
        exit_step = parallel.broadcast_int(int(torch.randint(len(self.rollout_cfg.timesteps), ())))
        with self.autocast:
            return rollout(self.m.generator, self.schedule, self.rollout_cfg, cond, self._noise(cond.shape[0]),
                           exit_step=exit_step, grad=grad, compute_dtype=self.compute_dtype)

    def _timesteps(self, batch: int) -> torch.Tensor:
        """One DMD/critic timestep per sample (uniform -> shift -> clamp), shape [B]."""
        return sample_training_timesteps((batch,), shift=self.cfg.schedule.timestep_shift,
                                         min_t=self.tr.min_timestep, max_t=self.tr.max_timestep,
                                         device=self.device)

    def _x0(self, model: WanModel, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Bidirectional x0 prediction at per-sample timesteps t [B] (flow -> x0 on the score grid)."""
        dtype = self.compute_dtype
        with self.autocast:
            flow = model(x_t.to(dtype), t, context.to(dtype))
        return self.score_schedule.flow_to_x0(flow.float(), x_t.float(), t)

    # ---------------------------------------------------------------------------------- losses
    def generator_loss(self, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        cond, uncond = self._encode(prompts)
        x = self._rollout(cond, grad=True)
        self._last_sample = (x[0].detach(), prompts[0])
        info = {}
        reward = None
        if self.tr.beta != 0:
            reward, scores = self._reward(x, prompts)
            info.update({f"reward_{name.lower()}": value for name, value in scores.items()})
        with torch.no_grad():
            t = self._timesteps(x.shape[0])
            x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t[:, None])
            x0_cond = self._x0(self.m.teacher, x_t, t, cond)
            x0_uncond = self._x0(self.m.teacher, x_t, t, uncond)
            x0_fake = self._x0(self.m.critic, x_t, t, cond)
            grad, _ = dmd_gradient(x.detach().float(), x0_cond, x0_uncond, x0_fake, self.tr.guidance_scale)
        loss, loss_info = re_dmd_loss(x.float(), grad, reward, beta=self.tr.beta,
                                      reward_weighting=self.tr.reward_weighting)
        info.update(loss_info)
        return loss, info

    def _reward(self, x: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ``training.reward_key`` score of the decoded latents ``x`` ``[B]``, and every score the reward gives."""
        with torch.no_grad():
            pixels = self.m.vae.decode(x.detach().to(self.m.vae.dtype))
            scores = self.m.reward.score(pixels, prompts)
        if self.tr.reward_key not in scores:
            raise ValueError(f"training.reward_key={self.tr.reward_key!r} is not a score of model.reward="
                             f"{self.cfg.model.reward!r}, which gives {sorted(scores)}")
        return scores[self.tr.reward_key].to(self.device), scores

    def critic_loss(self, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        cond, _ = self._encode(prompts)
        info, weights = {}, None
        with torch.no_grad():
            x = self._rollout(cond, grad=False).float()
            if self.tr.critic_tilt_beta != 0:
                reward, _ = self._reward(x, prompts)
                weights = critic_tilt_weights(reward, self.tr.critic_tilt_beta)
                info.update({"reward": reward.float().mean(), "tilt_weight_max": weights.max()})
            t = self._timesteps(x.shape[0])
            noise = torch.randn_like(x)
            x_t = self.schedule.add_noise(x, noise, t[:, None])
        with self.autocast:
            flow = self.m.critic(x_t.to(self.compute_dtype), t, cond.to(self.compute_dtype)).float()
        if self.tr.critic_flow_from_x0:
            flow = reference_critic_flow(flow, x_t, t, self.schedule, self.score_schedule)
        return critic_loss(flow, noise, x, weights), info

    def ode_loss(self, batch: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, dict]:
        """ODE regression of the causal student (module docstring)."""
        states, prompts = batch  # [B, S + 1, F, C, h, w]: states at the student's timesteps, then the clean sample
        cond, _ = self._encode(prompts)
        x_t, t, trained = ode_regression_inputs(states, self.rollout_cfg.timesteps,
                                                self.m.generator.causal.frames_per_block,
                                                clean_context=self.tr.ode_clean_context)
        with self.autocast:
            flow = self.m.generator(x_t.to(self.compute_dtype), t, cond.to(self.compute_dtype), causal=True)
        x0 = self.schedule.flow_to_x0(flow.float(), x_t.float(), t)
        return ode_regression_loss(x0, states[:, -1], trained), {}

    def teacher_loss(self, batch: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, dict]:
        """Flow matching of the bidirectional teacher with CFG dropout (module docstring)."""
        x0, prompts = batch
        cond, uncond = self._encode(prompts)
        drop = torch.rand(len(prompts), device=self.device) < self.tr.cfg_dropout
        context = torch.where(drop[:, None, None], uncond, cond)
        t = self._timesteps(len(prompts))
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t[:, None])
        with self.autocast:
            flow = self.m.teacher(x_t.to(self.compute_dtype), t, context.to(self.compute_dtype))
        return flow_matching_loss(flow, noise, x0), {}

    # ----------------------------------------------------------------------------------- steps
    def _update(self, name: str, loss_fn, logs: StepLog) -> None:
        """One optimizer step of the trained model ``name`` over ``gradient_accumulation_steps`` micro-batches."""
        model, optimizer, max_norm = self.models[name], self.optimizers[name], self.max_norms[name]
        accum = self.tr.gradient_accumulation_steps
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accum):
            loss, info = loss_fn(self._next_batch())
            # Agreed across ranks, so a NaN on one rank stops every rank at the same point (no hang).
            if not parallel.all_ranks_ok(bool(torch.isfinite(loss.detach()).all())):
                raise TrainingDiverged(f"{name} loss is {loss.item()} at step {self.step}; weights were not "
                                       f"updated. Last good checkpoint: {self.latest_checkpoint() or 'none yet'}")
            (loss / accum).backward()
            logs.add(f"{name}_", {"loss": loss, **info})
        # FSDP2 gradients are DTensors: the norm is taken over every rank's shards, returned as a DTensor.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        for group in optimizer.param_groups:  # a function of the step alone, so a resumed run gets the same values
            group["lr"] = self.base_lrs[name] * lr_factor(self.step, self.tr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs.set(f"{name}_grad_norm", grad_norm.item())

    def train_step(self) -> dict:
        logs = StepLog()
        start = time.time()
        if self.mode == "teacher":
            self._update("teacher", self.teacher_loss, logs)
        elif self.mode == "ode":
            self._update("generator", self.ode_loss, logs)
        elif is_generator_step(self.step, self.tr):
            self._update("generator", self.generator_loss, logs)
            if self.step >= self.tr.ema_start_step:
                if self.ema is None:  # starts as a copy of the current weights, like the reference
                    self.ema = ShardedEMA(self.m.generator)
                else:
                    self.ema.update(self.m.generator, self.tr.ema_weight)
        if self.mode == "dmd":
            self._update("critic", self.critic_loss, logs)
        self.step += 1
        values = logs.reduce()
        values["step"] = self.step
        values["iteration_time"] = time.time() - start
        return values

    def train(self) -> None:
        bar = tqdm(total=self.tr.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.dist.is_main)
        last = {name: float("nan") for name in self.models}
        # Log lines (metrics, saves) go through tqdm.write, above the bar instead of over it.
        with logging_redirect_tqdm(), bar:
            while self.step < self.tr.max_steps:
                values = self.train_step()
                self._log(values)
                bar.update(1)
                last = {name: values.get(f"{name}_loss", loss) for name, loss in last.items()}
                bar.set_postfix({name[:6]: f"{loss:.4g}" for name, loss in last.items()})
                if self.tr.sample_every and self.step % self.tr.sample_every == 0:
                    self.write_sample()
                if self.step % self.tr.save_every == 0 or self.step == self.tr.max_steps:
                    self.save()

    # -------------------------------------------------------------------------------- logging
    @torch.no_grad()
    def write_sample(self) -> Path | None:
        """Decode the latest generator rollout (rank 0) to ``samples/step_N.mp4`` and log it to wandb."""
        if not self.dist.is_main or self._last_sample is None:
            return None
        latents, prompt = self._last_sample
        frames = self.m.vae.decode(latents[None].to(self.m.vae.dtype))[0]
        path = self.logdir / SAMPLE_DIR / f"step_{self.step:06d}.mp4"
        with Mp4Writer(path, fps=self.cfg.video.fps) as writer:
            writer.write(frames)
        if self.run_log.wandb is not None:
            import wandb

            self.run_log.wandb.log({"sample": wandb.Video(str(path), caption=prompt)}, step=self.step)
        return path

    def _log(self, values: dict) -> None:
        self.run_log.write(values, self.step)

    # ---------------------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        return checkpointing.latest_checkpoint(self.ckpt_dir)

    def save(self) -> Path:
        """Resumable DCP checkpoint + the reference-format export, both written atomically; then only the newest
        ``keep_last_checkpoints`` resumable checkpoints are kept."""
        path = self.ckpt_dir / f"step_{self.step:06d}"
        extra = {"step": self.step, "sampler": self.sampler.state_dict(), "has_ema": self.ema is not None}
        checkpointing.save_training_state(path, models=self.models, optimizers=self.optimizers,
                                          stateful={"ema": self.ema} if self.ema is not None else None,
                                          extra=extra)
        weights = {name: checkpointing.full_state_dict(model) for name, model in self.models.items()}
        ema_sd = self.ema.full_state_dict(self.m.generator) if self.ema is not None else None
        if self.tr.lora.rank:  # exports hold plain weights: the adapters merged in
            scaling = lora_scaling(self.tr.lora)
            weights = {name: ckpt.merge_lora(sd, scaling) for name, sd in weights.items()}
            ema_sd = ckpt.merge_lora(ema_sd, scaling) if ema_sd is not None else None
        if self.dist.is_main:
            export = self.logdir / f"{EXPORT_PREFIX}{self.step:06d}" / "model.pt"
            if self.mode == "teacher":
                ckpt.export_model_checkpoint(export, weights["teacher"])
            else:  # dmd: the reference trainer format; ode: {"generator"}, the format of ode_init.pt
                ckpt.export_reference_checkpoint(export, weights["generator"], weights.get("critic"), ema_sd)
            for old in checkpointing.prune_checkpoints(self.ckpt_dir, self.tr.keep_last_checkpoints):
                log.info("removed %s (keep_last_checkpoints=%d)", old, self.tr.keep_last_checkpoints)
            log.info("saved %s", path)
        parallel.barrier()
        return path

    def resume(self) -> None:
        """Restore models, optimizers, EMA, step, data position and every rank's RNG from the newest checkpoint."""
        path = self.latest_checkpoint()
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
            return
        has_ema = checkpointing.checkpoint_extra(path)["has_ema"]
        # shards shaped for this run; the saved values are loaded into it
        ema = ShardedEMA(self.m.generator) if has_ema else None
        meta = checkpointing.load_training_state(path, models=self.models, optimizers=self.optimizers,
                                                 stateful={"ema": ema} if has_ema else None)
        self.step = meta["step"]
        self.sampler.load_state_dict(meta["sampler"])  # re-partitions the epoch if the number of ranks changed
        self.ema = ema if has_ema else None
        saved_world = meta["sampler"].get("world_size", self.dist.world_size)
        log.info("resumed from %s at step %d%s", path, self.step,
                 f" (saved by {saved_world} ranks, now {self.dist.world_size})"
                 if saved_world != self.dist.world_size else "")
        log.info("remaining: %s", training_budget(self.tr, self.dist.world_size, self.step))
