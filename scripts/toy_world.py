"""The toy world, end to end: teacher -> ODE pairs -> ODE init -> DMD / Re-DMD -> long rollouts -> report.

    python scripts/toy_world.py                     # the full run (~2.5 h on 2 CPU cores; --seeds 1: 1.5 h)
    python scripts/toy_world.py --smoke             # every stage for a few steps (< 2 min; CI runs this)
    python scripts/toy_world.py --retrain_teacher   # also retrain configs/toy/teacher.pt (~2.5 h on 2 cores)
    python scripts/toy_world.py --seeds 5 --beta 2 training.lr=3e-4   # an ablation: overrides go to DMD runs

Every training stage is ``train.py`` with a config of ``configs/toy/`` (the project's trainer, rollout, losses and
KV cache; nothing here is a second copy), run as a subprocess with one thread per process: the DMD runs ``--jobs``
at a time, a stage that runs alone (ODE pairs, ODE init, teacher) under torchrun with ``--jobs`` CPU ranks and the
same global batch. A stage whose output exists in ``--out`` is reused (``--force`` redoes them), so an interrupted run
continues where it stopped. The script prints the acceptance gates as a table next to the data's values, writes
``results.json``, ``report.md`` and the plots to ``--out``, and exits 1 when a gate fails (never in ``--smoke``,
whose models are trained for a few steps only). docs/toy_world.md explains the gates and shows the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_forcing.extras import MissingExtra, require  # noqa: E402

try:
    require("eval", "scripts/toy_world.py (its report plots)")
except MissingExtra as err:
    sys.exit(f"error: {err}")

from reward_forcing.build import build_dit, build_pipeline, build_text_encoder  # noqa: E402
from reward_forcing.config import load_config  # noqa: E402
from reward_forcing.toy import evaluate as ev  # noqa: E402
from reward_forcing.toy import report  # noqa: E402
from reward_forcing.toy.world import data_reference  # noqa: E402

TEACHER = ROOT / "configs/toy/teacher.pt"
CONFIGS = {name: ROOT / f"configs/toy/{name}.yaml" for name in ("teacher", "ode", "dmd")}
EXPORT = "export.pt"  # each training stage's final weights, copied out of its run folder


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the whole Reward Forcing recipe on the toy world and check the "
                                "acceptance gates (docs/toy_world.md).",
                                epilog="Extra key=value arguments override the DMD / Re-DMD configs.")
    p.add_argument("--out", default="runs/toy", help="output folder (default runs/toy)")
    p.add_argument("--smoke", action="store_true", help="every stage for a few steps; gates not enforced")
    p.add_argument("--retrain_teacher", action="store_true", help=f"train the teacher (~2.5 h on 2 cores) and "
                   f"replace {TEACHER.name}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per beta for DMD and Re-DMD (default 3)")
    p.add_argument("--beta", type=float, default=3.0, help="Re-DMD reward temperature (default 3)")
    p.add_argument("--dmd_steps", type=int, default=None, help="training steps of each DMD run (config: 300)")
    p.add_argument("--pairs", type=int, default=512, help="ODE pairs to sample (default 512)")
    p.add_argument("--ode_guidance", type=float, default=None,
                   help="the teacher's CFG for the ODE pairs, in the sampler's convention (1 = the conditional "
                        "teacher, what DMD with training.guidance_scale=0 distils toward; default: configs/toy/ode.yaml's "
                        "3). A new value needs a new --out: existing pairs are reused")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once (default 2: one per core)")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    p.add_argument("--study", default="recipe", choices=["recipe", "redmd"],
                   help="recipe: the whole recipe and its gates (default); redmd: the Re-DMD study (docs/toy_world.md, "
                        "'Re-DMD'): plain DMD, the reward-tilted critic at beta -1 / +1, the reference's Re-DMD at "
                        "--beta, and two positive controls (DMD toward a fine-tuned faster teacher; toward the teacher "
                        "with one more unit of guidance), on the 'any' prompts, --seeds seeds each (~hours on 2 cores)")
    p.add_argument("--gen_updates", type=int, default=300, help="redmd: generator updates per run (default 300)")
    p.add_argument("--critic_ratio", type=int, default=2, help="redmd: critic steps per generator step (default 2)")
    p.add_argument("--control_fast", type=float, default=0.63,
                   help="redmd: the positive control's teacher is fine-tuned on a world whose 'any' clips are fast "
                        "with this probability (default 0.63)")
    p.add_argument("--control_steps", type=int, default=600, help="redmd: the control teacher's fine-tuning steps")
    p.add_argument("--methods", default=list(REDMD_METHODS), type=comma_list,
                   help="redmd: the methods to train, comma-separated (dmd is always needed: every method is "
                        "compared with it). E.g. 'dmd,control cfg' runs a positive control alone first")
    p.add_argument("--evaluate_only", action="store_true",
                   help="redmd: train nothing; evaluate the runs that finished (a method missing on a seed is left "
                        "out of that seed's comparisons)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the DMD runs")
    return p.parse_intermixed_args(argv)


class Stages:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out).resolve()  # the trainings run in the repository root
        self.smoke = args.smoke
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                    "HF_HUB_OFFLINE": "1"}

    # ------------------------------------------------------------------------------------- helpers
    def launcher(self, ranks: int) -> list[str]:
        """``python``, or torchrun with ``ranks`` CPU processes (gloo) for a stage that runs alone."""
        if ranks == 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]

    def _train_command(self, config: str, logdir: Path, overrides: list[str], ranks: int = 1) -> list[str]:
        if ranks > 1:  # the same global batch, split over the ranks
            batch = load_config(CONFIGS[config], overrides).training.batch_size
            overrides = [*overrides, f"training.global_batch_size={batch}"]
        return [*self.launcher(ranks), str(ROOT / "train.py"), "--config_path", str(CONFIGS[config]), "--logdir",
                str(logdir), "--disable-wandb", "--overwrite", *overrides]

    def run_all(self, jobs: list[tuple[str, list[str], Path]]) -> None:
        """Run ``(name, command, log file)`` jobs, ``--jobs`` at a time; stop at the first failure."""
        pending, running = list(jobs), []
        try:
            while pending or running:
                while pending and len(running) < max(1, self.args.jobs):
                    name, cmd, log = pending.pop(0)
                    print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
                    running.append((name, log, time.time(), subprocess.Popen(
                        cmd, cwd=ROOT, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)))
                time.sleep(0.2)
                for job in list(running):
                    name, log, start, proc = job
                    if proc.poll() is None:
                        continue
                    running.remove(job)
                    if proc.returncode:
                        tail = log.read_text().replace("\r", "\n").splitlines()[-15:]
                        raise SystemExit(f"error: {name} failed (exit {proc.returncode}); last lines of {log}:\n"
                                         + "\n".join(tail))
                    print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {time.time() - start:.0f} s", flush=True)
        finally:  # a failure, Ctrl-C or SIGTERM leaves no training behind on the cores (checkpoints stay)
            for _, _, _, proc in running:
                proc.terminate()
            for _, _, _, proc in running:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def train(self, jobs: list[tuple[str, str, list[str]]]) -> list[Path]:
        """Training stages ``(name, config, overrides)``; returns each run's export (reused when present)."""
        todo, exports = [], []
        for name, config, overrides in jobs:
            logdir = self.out / name
            exports.append(logdir / EXPORT)
            steps = load_config(CONFIGS[config], overrides).training.max_steps
            if not exports[-1].is_file() and finished(logdir, steps) and not self.args.force:
                # finished before the run that started it was stopped (its export was not copied out yet)
                shutil.copyfile(sorted(logdir.glob("checkpoint_model_*/model.pt"))[-1], exports[-1])
            if exports[-1].is_file() and not self.args.force:
                print(f"reuse {exports[-1]}")
                continue
            todo.append((name, config, logdir, overrides))
        # A stage that runs alone uses every core through torchrun; several runs take one core each.
        ranks = self.args.jobs if len(todo) == 1 and not self.smoke else 1
        todo = [(name, self._train_command(config, logdir, overrides, ranks), self.out / f"{name}.log")
                for name, config, logdir, overrides in todo]
        self.run_all(todo)
        for export in exports:
            if not export.is_file():  # the newest export of the run becomes its final weights
                newest = sorted(export.parent.glob("checkpoint_model_*/model.pt"))[-1]
                shutil.copyfile(newest, export)
        return exports

    # --------------------------------------------------------------------------------------- stages
    def teacher(self) -> Path:
        if not (self.smoke or self.args.retrain_teacher):
            if not TEACHER.is_file():
                raise SystemExit(f"error: {TEACHER} is missing; train it with --retrain_teacher")
            return TEACHER
        steps = ["training.max_steps=3", "training.save_every=3", "training.batch_size=4"] if self.smoke else []
        (export,) = self.train([("teacher", "teacher", steps)])  # from scratch
        if not self.smoke:
            shutil.copyfile(export, TEACHER)
            print(f"wrote {TEACHER}")
        return export

    def ode_pairs(self, teacher: Path) -> Path:
        path = self.out / "ode_pairs.pt"
        if path.is_file() and not self.args.force:
            print(f"reuse {path}")
            return path
        count, steps = (8, 4) if self.smoke else (self.args.pairs, 32)
        ranks = 1 if self.smoke else self.args.jobs  # torchrun on the CPU (gloo): one rank per core
        guidance = [] if self.args.ode_guidance is None else [f"training.guidance_scale={self.args.ode_guidance}"]
        cmd = [*self.launcher(ranks), str(ROOT / "scripts/generate_ode_pairs.py"), "--config_path", str(CONFIGS["ode"]),
               "--out", str(path), "--num_samples", str(count), "--steps", str(steps),
               f"training.teacher_ckpt={teacher}", *guidance]
        self.run_all([("ode_pairs", cmd, self.out / "ode_pairs.log")])
        return path

    def ode(self, teacher: Path, pairs: Path) -> Path:
        steps = ["training.max_steps=3", "training.save_every=3", "training.batch_size=4"] if self.smoke else []
        (export,) = self.train([("ode", "ode", [f"training.generator_ckpt={teacher}",
                                                f"training.teacher_ckpt={teacher}",
                                                f"training.ode_pairs_path={pairs}", *steps])])
        return export

    def dmd(self, teacher: Path, student: Path) -> dict[tuple[float, int], Path]:
        seeds = 1 if self.smoke else self.args.seeds
        steps = ["training.max_steps=2", "training.save_every=2", "training.batch_size=2",
                 "training.dfake_gen_update_ratio=1"] if self.smoke else (
            [f"training.max_steps={self.args.dmd_steps}", f"training.save_every={self.args.dmd_steps}"]
            if self.args.dmd_steps else [])
        runs = [(beta, seed) for seed in range(seeds) for beta in (0.0, self.args.beta)]
        jobs = [(f"dmd_beta{beta:g}_seed{seed}", "dmd",
                 [f"training.generator_ckpt={student}", f"training.teacher_ckpt={teacher}",
                  f"training.critic_ckpt={teacher}", f"training.beta={beta}", f"training.seed={seed}",
                  *steps, *self.args.overrides]) for beta, seed in runs]
        return dict(zip(runs, self.train(jobs)))


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(stages: Stages, teacher: Path, student: Path, dmd: dict[tuple[float, int], Path]) -> dict:
    smoke, beta = stages.smoke, stages.args.beta
    # The trainings are over: the evaluation has the cores (the smoke, a code-path check, runs beside other work)
    torch.set_num_threads(1 if smoke else stages.args.jobs)
    cfg = load_config(CONFIGS["dmd"], [*stages.args.overrides, f"training.generator_ckpt={student}",
                                       f"training.teacher_ckpt={teacher}"])  # e.g. causal.* for the students
    repeats, any_repeats, blocks = (1, 1, 4) if smoke else (4, 8, 40)
    prompts = ev.eval_prompts(("static", "fast"), repeats)  # 96 clips (smoke: 8, one per direction and speed)
    bimodal = ev.eval_prompts(("any",), any_repeats)  # 96 clips of the 'any' prompts (smoke: 4)
    if smoke:  # the code path, not the numbers: one colour
        prompts, bimodal = [p for p in prompts if p.startswith("red")], [p for p in bimodal if p.startswith("red")]
    text = build_text_encoder(cfg)
    results: dict = {"data": data_reference(ev.WORLD), "smoke": smoke, "beta": beta}
    videos = {}

    teacher_model = build_dit(cfg, "toy", weights=teacher, what="teacher").eval()
    steps = 4 if smoke else 32
    videos["teacher"] = ev.sample_teacher_videos(teacher_model, text, prompts + bimodal, steps=steps)
    results["teacher"] = ev.as_dict(ev.group_metrics(videos["teacher"], prompts + bimodal))

    def student_videos(weights: Path, chosen: list[str], **kw) -> torch.Tensor:
        pipe = build_pipeline(cfg, checkpoint=weights)
        return ev.sample_student_videos(pipe, chosen, **kw)

    videos["ode"] = student_videos(student, prompts + bimodal)
    results["ode"] = ev.as_dict(ev.group_metrics(videos["ode"], prompts + bimodal))

    results["dmd"] = {}
    fast, motion_any = {}, {}
    for (b, seed), weights in sorted(dmd.items()):
        name = f"beta{b:g}_seed{seed}"
        v = student_videos(weights, prompts + bimodal)
        videos[name] = v
        results["dmd"][name] = ev.as_dict(ev.group_metrics(v, prompts + bimodal))
        motion_any[name] = ev.metrics.net_motion(v[len(prompts):])
        fast[(b, seed)] = motion_any[name] > ev.FAST_THRESHOLD
    seeds = sorted({seed for _, seed in dmd})
    differences = torch.stack([fast[(beta, s)].float() - fast[(0.0, s)].float() for s in seeds])  # paired
    mean, low, high = ev.bootstrap_mean_ci(differences)
    results["re_dmd"] = {"per_seed": {str(s): {"fast_fraction_beta0": fast[(0.0, s)].float().mean().item(),
                                               f"fast_fraction_beta{beta:g}": fast[(beta, s)].float().mean().item()}
                                      for s in seeds},
                         "mean_difference": mean, "ci95": [low, high], "samples_per_seed": len(bimodal)}
    results["motion_any"] = {name: motion.tolist() for name, motion in motion_any.items()}

    long_prompts = ev.eval_prompts(("static", "fast"), 1)[:4 if smoke else None]  # 24 clips (smoke: 4)
    long_student = dmd[(0.0, seeds[0])]
    results["long_rollout"], results["long_windows"] = {}, {}
    for policy in ("none", "static", "ema"):
        v = student_videos(long_student, long_prompts, num_frames=3 * blocks, sink_policy=policy)
        window = min(21, v.shape[1])
        results["long_rollout"][policy] = ev.rollout_drift(v, long_prompts, window)
        results["long_windows"][policy] = ev.windowed(v)
        videos[f"long_{policy}"] = v[:4]
    videos["data"] = ev.WORLD.render(prompts[:24] , 9, torch.Generator().manual_seed(0))[0]
    return results, videos, prompts


def gates(results: dict) -> list[dict]:
    """The acceptance gates (docs/toy_world.md), each with its value, threshold and the data's value."""
    data = results["data"]
    rows = []

    def gate(stage, name, value, ok, threshold, reference="", kind="engineering"):
        rows.append({"stage": stage, "gate": name, "value": value, "threshold": threshold, "data": reference,
                     "pass": bool(ok), "kind": kind})

    t = results["teacher"]
    gap = t["fast"]["net_motion"] - t["static"]["net_motion"]
    gate("teacher", "speed gap (px/frame)", gap, gap >= 0.5 * data["speed_gap"], f">= {0.5 * data['speed_gap']:.3f}",
         f"{data['speed_gap']:.3f}")
    gate("teacher", "colour accuracy", t["all"]["colour_accuracy"], t["all"]["colour_accuracy"] >= 0.9, ">= 0.9", "1")
    gate("teacher", "blobs per frame", t["all"]["blobs_per_frame"], t["all"]["blobs_per_frame"] <= 1.3, "<= 1.3", "1")

    def direction(stage, name, groups):  # the fast prompts' blobs move the prompted way
        value = groups["fast"]["direction_accuracy"]
        gate(stage, f"{name}direction accuracy (fast)", value, value >= 0.9, ">= 0.9", "1")

    direction("teacher", "", t)
    o = results["ode"]
    for key in ("net_motion", "flicker"):
        ref, value = t["all"][key], o["all"][key]
        ok = abs(value - ref) <= 0.3 * abs(ref)
        gate("ode init", f"{key.replace('_', ' ')} vs teacher {ref:.3f}", value, ok, "within 30 %",
             f"{data['flicker'] if key == 'flicker' else ''}")
    direction("ode init", "", o)
    for name, d in results["dmd"].items():
        if not name.startswith("beta0_"):
            continue
        gate("dmd", f"{name} colour accuracy", d["all"]["colour_accuracy"], d["all"]["colour_accuracy"] >= 0.9,
             ">= 0.9", "1")
        gate("dmd", f"{name} static < fast motion", d["fast"]["net_motion"] - d["static"]["net_motion"],
             d["static"]["net_motion"] < d["fast"]["net_motion"], "> 0", f"{data['speed_gap']:.3f}")
        direction("dmd", f"{name} ", d)
    r = results["re_dmd"]
    beta = results["beta"]
    every = all(v[f"fast_fraction_beta{beta:g}"] > v["fast_fraction_beta0"] for v in r["per_seed"].values())
    gate("re-dmd", f"fast fraction, beta {beta:g} - beta 0 (95% CI {r['ci95'][0]:+.3f}..{r['ci95'][1]:+.3f})",
         r["mean_difference"], every, "> 0 in every seed", "", kind="research")
    for policy, d in results["long_rollout"].items():
        ok = abs(d["std_ratio"] - 1) <= 0.3 and d["colour_accuracy"] >= 0.9
        gate("long rollout", f"{policy}: std last/first, colour {d['colour_accuracy']:.2f}", d["std_ratio"], ok,
             "within 30 %, colour >= 0.9", "1")
    return rows


def print_gates(rows: list[dict], smoke: bool) -> None:
    print(f"\n{'stage':<13} {'gate':<58} {'value':>9}  {'threshold':<26} {'data':>6}  result")
    for r in rows:
        verdict = "PASS" if r["pass"] else ("fail (smoke)" if smoke else "FAIL")
        print(f"{r['stage']:<13} {r['gate']:<58} {r['value']:>9.3f}  {r['threshold']:<26} {r['data']:>6}  "
              f"{verdict}{'' if r['kind'] == 'engineering' else ' [research]'}")


# ------------------------------------------------------------------------------------------ Re-DMD study
REDMD_METHODS = {  # name -> overrides of the DMD config (the reward is net motion: 0 static, 1 fast)
    "dmd": ["training.beta=0"],
    "tilt +1": ["training.beta=0", "training.critic_tilt_beta=1"],
    "tilt -1": ["training.beta=0", "training.critic_tilt_beta=-1"],
    "re-dmd": ["training.critic_tilt_beta=0"],  # training.beta=--beta, set below
    "control": ["training.beta=0"],  # plain DMD toward the control teacher
    "control cfg": ["training.beta=0"],  # plain DMD toward the teacher with one more unit of guidance (set below)
}
CONTROLS = ("control", "control cfg")


def redmd_runs(stages: Stages, teacher: Path, student: Path) -> tuple[Path | None, dict[tuple[str, int], Path]]:
    """Train the control teacher (when the control is one of the methods), then every method x seed on the 'any'
    prompts; returns the control teacher (or None) and the runs' folders."""
    args, smoke = stages.args, stages.smoke
    steps = 3 if smoke else args.control_steps
    control = None
    if "control" in args.methods:
        (control,) = stages.train([("control_teacher", "teacher", [
            f"training.teacher_ckpt={teacher}", f"training.toy_any_fast={args.control_fast}",
            f"training.max_steps={steps}", f"training.save_every={steps}", f"training.lr_cooldown_steps={steps // 2}",
            "training.lr=3e-4", *(["training.batch_size=4"] if smoke else [])])])
    guidance = load_config(CONFIGS["dmd"], args.overrides).training.guidance_scale
    updates, ratio = (2, 1) if smoke else (args.gen_updates, args.critic_ratio)
    total = updates * ratio
    common = [f"training.generator_ckpt={student}", f"training.data_path={ROOT / 'configs/toy/prompts_any.txt'}",
              f"training.dfake_gen_update_ratio={ratio}", f"training.max_steps={total}",
              f"training.save_every={max(ratio, total // 3 // ratio * ratio)}",
              *(["training.batch_size=2"] if smoke else []), *args.overrides]
    seeds = range(1 if smoke else args.seeds)
    # The tilted critic's comparisons first, every seed, then Re-DMD and the control: a study cut short (--evaluate_only
    # on what finished) still has its main gates on every seed
    chosen = set(args.methods)
    order = [(m, s) for group in (("dmd", "tilt +1", "tilt -1"), ("re-dmd", *CONTROLS)) for s in seeds for m in group
             if m in chosen]
    jobs = []
    for method, seed in order:
        scores = control if method == "control" else teacher
        beta = [f"training.beta={args.beta}"] if method == "re-dmd" else []
        if method == "control cfg":  # after the study's overrides, so it wins
            beta.append(f"training.guidance_scale={guidance + 1:g}")
        jobs.append((redmd_run_name(method, seed), "dmd",
                     [*common, f"training.teacher_ckpt={scores}", f"training.critic_ckpt={scores}",
                      f"training.seed={seed}", *REDMD_METHODS[method], *beta]))
    if args.evaluate_only:  # what finished: a run counts once it exported its last step
        return control, {key: stages.out / name for key, (name, _, _) in zip(order, jobs)
                         if finished(stages.out / name, total)}
    exports = stages.train(jobs)
    return control, {key: export.parent for key, export in zip(order, exports)}


def redmd_run_name(method: str, seed: int) -> str:
    return f"redmd_{method.replace(' ', '')}_seed{seed}"


def finished(run: Path, steps: int) -> bool:
    exports = sorted(run.glob("checkpoint_model_*/model.pt"))
    return bool(exports) and int(exports[-1].parent.name.rsplit("_", 1)[1]) == steps


def redmd_evaluate(stages: Stages, teacher: Path, control: Path | None, runs: dict[tuple[str, int], Path]) -> dict:
    """Fast fraction on the 'any' prompts (fixed noise) along each run, the other metrics at its end, the paired
    bootstrap of every method against plain DMD, and the prediction for the tilted critic."""
    smoke, beta = stages.smoke, stages.args.beta
    # The trainings are over: the evaluation has the cores (the smoke, a code-path check, runs beside other work)
    torch.set_num_threads(1 if smoke else stages.args.jobs)
    cfg = load_config(CONFIGS["dmd"], [f"training.teacher_ckpt={teacher}", *stages.args.overrides])
    text = build_text_encoder(cfg)
    bimodal = ev.eval_prompts(("any",), 1 if smoke else 8)[:4 if smoke else None]
    others = ev.eval_prompts(("static", "fast"), 1 if smoke else 4)[::3 if smoke else 1]
    results: dict = {"teacher_fast_fraction": {}, "curves": {}, "final": {}, "fast": {}}
    # Each run's teacher at the guidance it used, the distribution DMD converges to. DMD's real score is the
    # reference's cond + s (cond - uncond) (losses.dmd_gradient), the sampler's uncond + (s + 1) (cond - uncond).
    g = cfg.training.guidance_scale
    teachers = [("teacher", teacher, g + 1)]
    if control is not None:
        teachers.append(("control teacher", control, g + 1))
    if any(m == "control cfg" for m, _ in runs):
        teachers.append(("teacher, guidance +1", teacher, g + 2))
    for name, weights, guidance in teachers:
        model = build_dit(cfg, "toy", weights=weights, what="teacher").eval()
        v = ev.sample_teacher_videos(model, text, bimodal, steps=4 if smoke else 32, guidance_scale=guidance)
        results["teacher_fast_fraction"][name] = (ev.metrics.net_motion(v) > ev.FAST_THRESHOLD).float().mean().item()
    rewards = {}
    for (method, seed), run in sorted(runs.items()):
        exports = sorted(run.glob("checkpoint_model_*/model.pt"))
        for export in exports:
            pipe = build_pipeline(cfg, checkpoint=export)
            motion = ev.metrics.net_motion(ev.sample_student_videos(pipe, bimodal))
            fast = motion > ev.FAST_THRESHOLD
            updates = int(export.parent.name.rsplit("_", 1)[1]) // max(1, stages.args.critic_ratio if not smoke else 1)
            results["curves"].setdefault(method, {}).setdefault(updates, []).append(fast.float().mean().item())
            if export == exports[-1]:
                results["fast"][(method, seed)] = fast
                rewards[(method, seed)] = motion / ev.WORLD.fast_speed
                v = ev.sample_student_videos(pipe, others)
                results["final"].setdefault(method, []).append(ev.as_dict(ev.group_metrics(v, others)))
    table = {}
    for method in REDMD_METHODS:  # each method on the seeds where it and plain DMD both finished
        seeds = sorted(s for m, s in runs if m == method and ("dmd", s) in runs)
        if not seeds:
            continue
        per_seed = [results["fast"][(method, s)].float().mean().item() for s in seeds]
        base = [results["fast"][("dmd", s)].float().mean().item() for s in seeds]
        diff = torch.stack([results["fast"][(method, s)].float() - results["fast"][("dmd", s)].float() for s in seeds])
        mean, low, high = ev.bootstrap_mean_ci(diff)
        finals = results["final"][method]
        table[method] = {"seeds": seeds, "fast_fraction": per_seed, "dmd_fast_fraction": base, "difference": mean,
                         "ci95": [low, high],
                         **{key: sum(f[group][metric] for f in finals) / len(finals) for key, group, metric in [
                             ("static_motion", "static", "net_motion"), ("fast_motion", "fast", "net_motion"),
                             ("direction", "fast", "direction_accuracy"), ("flicker", "all", "flicker"),
                             ("colour", "all", "colour_accuracy"), ("blobs", "all", "blobs_per_frame")]}}
    # The prediction: the tilt multiplies the odds of the fast mode by exp(beta * reward gap between the modes)
    dmd_seeds = table["dmd"]["seeds"]
    r = torch.cat([rewards[("dmd", s)] for s in dmd_seeds])
    f = torch.cat([results["fast"][("dmd", s)] for s in dmd_seeds])
    gap = (r[f].mean() - r[~f].mean()).item() if f.any() and (~f).any() else 1.0
    p0 = sum(table["dmd"]["fast_fraction"]) / len(dmd_seeds)
    odds = p0 / max(1e-6, 1 - p0)
    for method, b in (("tilt +1", 1.0), ("tilt -1", -1.0), ("re-dmd", 0.0)):  # Re-DMD's fixed point is the teacher
        if method not in table:
            continue
        predicted = odds * math.exp(b * gap)
        table[method]["predicted_fast_fraction"] = predicted / (1 + predicted)
    results["reward_gap"] = gap
    results["table"] = table
    results["fast"] = {f"{m} seed{s}": v.tolist() for (m, s), v in results["fast"].items()}
    results["beta"] = beta
    return results


def redmd_gates(results: dict) -> list[dict]:
    t = results["table"]
    rows = []

    def gate(name, value, ok, threshold, kind="research"):
        rows.append({"stage": "re-dmd study", "gate": name, "value": value, "threshold": threshold, "data": "",
                     "pass": bool(ok), "kind": kind})

    def seeds(m):
        return f"{len(m['seeds'])} seed{'s' if len(m['seeds']) > 1 else ''}"

    missing = [m for m in (*CONTROLS, "tilt +1", "tilt -1", "re-dmd") if m not in t]
    for method in missing:  # a study cut short: said, and failed, never passed silently
        gate(f"{method}: no finished run", float("nan"), False, "a finished run per seed")
    shares = results["teacher_fast_fraction"]
    for method, teacher, how in (("control", "control teacher", "fine-tuned"),
                                 ("control cfg", "teacher, guidance +1", "guidance +1")):
        if method not in t:
            continue
        control = t[method]
        gate(f"positive control ({how}): student toward a teacher at {shares[teacher]:.2f} fast, not "
             f"{shares['teacher']:.2f} ({seeds(control)}, CI {control['ci95'][0]:+.3f}..{control['ci95'][1]:+.3f})",
             control["difference"], control["ci95"][0] > 0, "CI above 0")
    for method, sign in (("tilt +1", 1), ("tilt -1", -1)):
        if method not in t:
            continue
        m = t[method]
        every = all(sign * (a - b) > 0 for a, b in zip(m["fast_fraction"], m["dmd_fast_fraction"]))
        excludes = m["ci95"][0] > 0 if sign > 0 else m["ci95"][1] < 0
        gate(f"{method} vs dmd ({seeds(m)}, CI {m['ci95'][0]:+.3f}..{m['ci95'][1]:+.3f}; predicted "
             f"{m['predicted_fast_fraction'] - sum(m['dmd_fast_fraction']) / len(m['dmd_fast_fraction']):+.3f})",
             m["difference"], every and excludes, f"{'>' if sign > 0 else '<'} 0 every seed, CI excludes 0")
    if "re-dmd" in t:
        m = t["re-dmd"]
        gate(f"re-dmd beta {results['beta']:g} vs dmd ({seeds(m)}, CI {m['ci95'][0]:+.3f}..{m['ci95'][1]:+.3f}), "
             "reported", m["difference"], True, "reported")
    return rows


def redmd_report(out: Path, results: dict, rows: list[dict]) -> Path:
    lines = ["| method | fast fraction per seed | mean | vs dmd (95 % CI) | predicted | static motion | fast motion | "
             "direction | flicker | colour | blobs/frame |", "|" + "---|" * 11]
    for method, m in results["table"].items():
        pred = m.get("predicted_fast_fraction")
        lines.append(f"| {method} | {' / '.join(f'{x:.3f} (seed {s})' for x, s in zip(m['fast_fraction'], m['seeds']))} | "
                     f"{sum(m['fast_fraction']) / len(m['fast_fraction']):.3f} | {m['difference']:+.3f} "
                     f"({m['ci95'][0]:+.3f}..{m['ci95'][1]:+.3f}) | {'-' if pred is None else f'{pred:.3f}'} | "
                     f"{m['static_motion']:.3f} | {m['fast_motion']:.3f} | {m['direction'] or 0:.3f} | "
                     f"{m['flicker']:.3f} | {m['colour']:.3f} | {m['blobs']:.2f} |")
    lines += ["", f"Teachers' fast fraction: {results['teacher_fast_fraction']}; reward gap between the modes "
              f"{results['reward_gap']:.3f}.", "", "| gate | value | threshold | result |", "|---|---|---|---|"]
    lines += [f"| {r['gate']} | {r['value']:.3f} | {r['threshold']} | {'pass' if r['pass'] else '**fail**'} |"
              for r in rows]
    plot = report.plot_fast_fraction(out, {m: {int(k): v for k, v in c.items()} for m, c in results["curves"].items()},
                                     results["teacher_fast_fraction"]["teacher"])
    lines += ["", f"![fast fraction against generator updates]({plot.name})"]
    path = out / "redmd.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.evaluate_only and args.study != "redmd":
        print("error: --evaluate_only evaluates the Re-DMD study's runs: add --study redmd", file=sys.stderr)
        return 2
    unknown = [m for m in args.methods if m not in REDMD_METHODS]
    if unknown or "dmd" not in args.methods:
        print(f"error: --methods {','.join(args.methods)}: "
              + (f"{unknown[0]!r} is not one of {', '.join(REDMD_METHODS)}" if unknown else "dmd must be one of them "
                 "(every method is compared with it)"), file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1 or args.pairs < 1 or args.gen_updates < 1 or args.critic_ratio < 1:
        print("error: --seeds, --jobs, --pairs, --gen_updates and --critic_ratio must be >= 1", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the trainings it started are stopped with it (run_all's finally)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.time()
    stages = Stages(args)
    teacher = stages.teacher()
    pairs = stages.ode_pairs(teacher)
    student = stages.ode(teacher, pairs)
    if args.study == "redmd":
        control, runs = redmd_runs(stages, teacher, student)
        print(f"[{time.strftime('%H:%M:%S')}] evaluating", flush=True)
        results = redmd_evaluate(stages, teacher, control, runs)
        rows = redmd_gates(results)
        results["gates"], results["minutes"] = rows, (time.time() - start) / 60
        (stages.out / "results_redmd.json").write_text(json.dumps(results, indent=1))
        path = redmd_report(stages.out, results, rows)
        print_gates(rows, args.smoke)
        print(f"\nresults: {stages.out / 'results_redmd.json'}, report: {path} ({results['minutes']:.1f} min)")
        return 0  # a research study: its gates are reported, never a failed exit
    dmd = stages.dmd(teacher, student)
    print(f"[{time.strftime('%H:%M:%S')}] evaluating", flush=True)
    results, videos, prompts = evaluate(stages, teacher, student, dmd)
    rows = gates(results)
    results["gates"] = rows
    results["minutes"] = (time.time() - start) / 60
    (stages.out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(stages.out, results, videos, prompts)
    print_gates(rows, args.smoke)
    print(f"\nresults: {stages.out / 'results.json'}, report: {stages.out / 'report.md'} "
          f"({results['minutes']:.1f} min)")
    failed = [r for r in rows if not r["pass"]]
    return 0 if args.smoke or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
