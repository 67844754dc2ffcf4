"""Where DMD's reward weightings lead, checked in 1-D, where every score is exact (docs/toy_world.md, "Re-DMD").

    python scripts/redmd_1d.py                      # the table (~2 minutes on one core)
    python scripts/redmd_1d.py --plot runs/redmd_1d.png

The teacher is a mixture of two modes: 'static' N(0, 0.1^2) with probability 1 - q and 'fast' N(1, 0.1^2) with
probability q (default 0.385). The generator is ideal: n free particles, each moved along its own DMD gradient (the
flexible generator of the fixed-point argument). Both scores are exact x0-predictions (posterior means) under the
project's noising y = (1 - t) x + t eps: the teacher's from its mixture, the critic's from the particles themselves,
each smoothed to the modes' width: the critic a perfect fit of the student's distribution at every step. The
reward is r = clamp(x, 0, 1): 0 static, 1 fast, like the toy world's motion reward.

The weights are the project's: the generator's through ``losses.re_dmd_loss`` (the reference's ``exp(beta r)``), the
critic's through ``losses.critic_tilt_weights``. The gradient is DMD's ``x0_fake - x0_real`` without the reference's
normaliser: that divides by ``mean |x - x0_real|`` over a sample's elements, which for a sample of one element is a
function of the noise draw, not of the sample, and moved plain DMD's rest point on its own (to ~0.5 in a trial);
over the thousands of elements of a video it is a smooth positive scale of the sample, which the argument covers.

Predicted rest points: plain DMD and Re-DMD at any beta, the teacher's q; the tilted critic at beta, the teacher
tilted, p_teacher exp(beta r) / Z: the odds q / (1 - q) times the ratio of the modes' mean exp(beta r), about
exp(0.92 beta) (the clamp leaves the modes' mean rewards 0.04 and 0.96).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward_forcing.training.losses import critic_tilt_weights, re_dmd_loss  # noqa: E402

WIDTH = 0.1  # each mode's standard deviation; the critic smooths its particles by the same width
MODES = torch.tensor([0.0, 1.0])  # static, fast


@dataclass
class Method:
    name: str
    generator_beta: float = 0.0  # the reference's Re-DMD: each sample's DMD loss weighted by exp(beta r)
    critic_beta: float = 0.0  # the tilted critic: its distribution weighted by exp(-beta r) / mean

    def predicted(self, teacher_fast: float) -> float:
        """The fast share of ``p_teacher exp(critic_beta r) / Z``: each mode's mass times its mean ``exp(beta r)``."""
        fast = teacher_fast * mean_exp_reward(MODES[1].item(), self.critic_beta)
        return fast / (fast + (1 - teacher_fast) * mean_exp_reward(MODES[0].item(), self.critic_beta))


METHODS = {m.name: m for m in (Method("dmd"), Method("re-dmd 1", generator_beta=1),
                               Method("re-dmd 3", generator_beta=3), Method("tilt +1", critic_beta=1),
                               Method("tilt -1", critic_beta=-1))}


def reward(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1)


def mean_exp_reward(centre: float, beta: float) -> float:
    """E[exp(beta r(x))] over the mode N(centre, WIDTH^2), by quadrature."""
    x = torch.linspace(centre - 8 * WIDTH, centre + 8 * WIDTH, 4001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - centre) / WIDTH) ** 2)
    return float((density * torch.exp(beta * reward(x))).sum() / density.sum())


def x0_prediction(y: torch.Tensor, t: torch.Tensor, centres: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E[x0 | y] for x0 ~ sum_k weights_k N(centres_k, WIDTH^2) and y = (1 - t) x0 + t eps; y, t ``[M]``."""
    a = (1 - t)[:, None]
    var = a ** 2 * WIDTH ** 2 + t[:, None] ** 2
    posterior = torch.softmax(torch.log(weights)[None] - 0.5 * (y[:, None] - a * centres[None]) ** 2 / var, dim=1)
    means = centres[None] + a * WIDTH ** 2 / var * (y[:, None] - a * centres[None])
    return (posterior * means).sum(1)


def simulate(method: Method, start_fast: float, *, teacher_fast: float = 0.385, particles: int = 512,
             steps: int = 3000, lr: float = 1.0, seed: int = 0, record_every: int = 0) -> dict:
    """Train one particle generator; returns its final fast fraction, the fast particles' mean position and
    (every ``record_every`` steps) the fast fraction along the way."""
    if not 0 < teacher_fast < 1 or not 0 <= start_fast <= 1:
        raise ValueError(f"teacher_fast must be in (0, 1) and start_fast in [0, 1], got {teacher_fast}, {start_fast}")
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(particles, generator=g) < start_fast).float() + WIDTH * torch.randn(particles, generator=g)
    teacher = torch.tensor([1 - teacher_fast, teacher_fast])
    curve = {}
    for step in range(steps):
        if record_every and step % record_every == 0:
            curve[step] = (x > 0.5).float().mean().item()
        t = 0.02 + 0.96 * torch.rand(particles, generator=g)  # the reference's [20, 980] of 1000
        y = (1 - t) * x + t * torch.randn(particles, generator=g)
        critic = critic_tilt_weights(reward(x), method.critic_beta)  # ones when critic_beta = 0
        grad = x0_prediction(y, t, x, critic / critic.sum()) - x0_prediction(y, t, MODES, teacher)
        moving = x.clone().requires_grad_(True)
        loss, _ = re_dmd_loss(moving[:, None], grad[:, None], reward=reward(x), beta=method.generator_beta)
        loss.backward()
        x = x - lr * particles * moving.grad  # d loss / d x_i = w_i g_i / n: each particle moves by lr w_i g_i
    fast = x > 0.5
    curve[steps] = fast.float().mean().item()
    return {"fast_fraction": curve[steps], "fast_mean": x[fast].mean().item() if fast.any() else float("nan"),
            "curve": curve}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DMD, the reference's Re-DMD and the reward-tilted critic on a 1-D "
                                "two-mode teacher with exact scores: where does each put the fast mode's share?")
    p.add_argument("--teacher_fast", type=float, default=0.385, help="the teacher's fast share (default 0.385)")
    p.add_argument("--starts", type=float, nargs="+", default=[0.1, 0.8], help="the students' initial fast shares")
    p.add_argument("--particles", type=int, default=512, help="the generator's free samples (default 512)")
    p.add_argument("--steps", type=int, default=3000, help="generator steps per run (default 3000)")
    p.add_argument("--lr", type=float, default=1.0, help="step size of a particle per unit weight and gradient")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--plot", type=Path, default=None, help="write the fast share against steps here (png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        print(f"error: --methods: {unknown[0]!r} is not one of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if not 0 < args.teacher_fast < 1 or not all(0 <= x <= 1 for x in args.starts) or args.particles < 2:
        print(f"error: --teacher_fast {args.teacher_fast} must be in (0, 1), --starts {args.starts} in [0, 1] and "
              f"--particles {args.particles} at least 2", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print(f"teacher fast share {args.teacher_fast}; {args.particles} particles, {args.steps} steps, lr {args.lr}\n")
    print("| method | predicted | " + " | ".join(f"from {s:g}" for s in args.starts) + " | fast mode's mean x |")
    print("|---|---|" + "---|" * len(args.starts) + "---|")
    curves = {}
    for name in args.methods:
        method, started = METHODS[name], time.time()
        runs = [simulate(method, s, teacher_fast=args.teacher_fast, particles=args.particles, steps=args.steps,
                         lr=args.lr, record_every=max(1, args.steps // 50)) for s in args.starts]
        curves[name] = [r["curve"] for r in runs]
        print(f"| {name} | {method.predicted(args.teacher_fast):.3f} | "
              + " | ".join(f"{r['fast_fraction']:.3f}" for r in runs)
              + f" | {sum(r['fast_mean'] for r in runs) / len(runs):.3f} |  ({time.time() - started:.0f} s)",
              flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, runs) in enumerate(curves.items()):
            for j, curve in enumerate(runs):
                ax.plot(list(curve), list(curve.values()), color=f"C{i}", label=name if j == 0 else None)
        ax.axhline(args.teacher_fast, color="k", ls=":", label="teacher")
        ax.set_xlabel("generator steps")
        ax.set_ylabel("fast share")
        ax.legend()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
