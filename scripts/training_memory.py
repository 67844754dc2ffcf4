"""Bytes a training job's DiTs hold, with and without LoRA: weights, gradients and AdamW moments per model, computed
on the meta device (no weights, no GPU). The figures of docs/memory.md come from here.

    python scripts/training_memory.py --config_path configs/reward_forcing.yaml
    python scripts/training_memory.py --config_path configs/reward_forcing.yaml --ranks 8 training.lora.rank=64

Counted: the generator, the critic and the teacher of ``training.mode`` at the dtypes train.py gives them on a GPU
with mixed precision (trained weights fp32, frozen bf16; with ``training.lora`` the trained model's weights are
frozen bf16 and its adapters fp32). Not counted: activations, the text encoder, the decoder and the reward model
(whole on every rank), and FSDP's gathered bf16 copy of the layer being computed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_forcing.config import load_config  # noqa: E402
from reward_forcing.models.wan import WanModel  # noqa: E402
from reward_forcing.training.lora import ParameterBytes, adapted_models, add_adapters, parameter_bytes  # noqa: E402

GB = 1e9


def model_bytes(cfg) -> dict[str, tuple[ParameterBytes, bool]]:
    """``{name: (bytes, lora)}`` of the DiTs of ``training.mode``, whole (the caller divides by the ranks)."""
    tr, out = cfg.training, {}
    trained = {"dmd": ["generator", "critic"], "ode": ["generator"], "teacher": ["teacher"]}[tr.mode]
    present = {"dmd": ["generator", "critic", "teacher"], "ode": ["generator"], "teacher": ["teacher"]}[tr.mode]
    adapted = adapted_models(tr)  # what training/build.py gives adapters
    for name in present:
        with torch.device("meta"):
            model = WanModel.from_flavor(getattr(cfg.model, name))
        lora = name in adapted
        if lora:
            add_adapters(model, tr.lora, frozen_dtype=torch.bfloat16)
        elif name not in trained:
            model.requires_grad_(False).to(torch.bfloat16)
        out[name] = (parameter_bytes(model, trained=name in trained), lora)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Extra key=value arguments override "
                                "the config, e.g. training.lora.rank=64 training.lora.critic=true")
    p.add_argument("--config_path", default="configs/reward_forcing.yaml")
    p.add_argument("--ranks", type=int, default=1, help="FSDP2 ranks the models are sharded over (default 1)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error(f"--ranks must be >= 1, got {args.ranks}")
    cfg = load_config(args.config_path, args.overrides)
    rows = model_bytes(cfg)
    print(f"{'model':<10} {'flavor':<6} {'lora':<5} {'parameters':>12} {'trainable':>12} {'weights GB':>11} "
          f"{'grads GB':>9} {'AdamW GB':>9} {'total GB':>9}   per rank of {args.ranks}")
    total = 0
    for name, (b, lora) in rows.items():
        total += b.total_bytes
        print(f"{name:<10} {getattr(cfg.model, name):<6} {('r' + str(cfg.training.lora.rank)) if lora else '-':<5} "
              f"{b.parameters / 1e9:>11.3f}B {b.trainable / 1e6:>11.1f}M {b.weight_bytes / GB:>11.2f} "
              f"{b.gradient_bytes / GB:>9.2f} {b.optimizer_bytes / GB:>9.2f} {b.total_bytes / GB:>9.2f}   "
              f"{b.total_bytes / args.ranks / GB:.2f}")
    print(f"{'all DiTs':<10} {'':<6} {'':<5} {'':>12} {'':>12} {'':>11} {'':>9} {'':>9} {total / GB:>9.2f}   "
          f"{total / args.ranks / GB:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
