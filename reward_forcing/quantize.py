"""Weight quantization of the DiT for inference (``model.quantize`` / ``inference.py --quantize``), with
optimum-quanto (the ``[quant]`` extra).

Only the linear maps of the transformer layers are quantized (attention q/k/v/o, self and cross, and the FFN:
98.1 % of the 1.3B model's parameters); embeddings, modulation tables, norms and the head keep their dtype.
Activations stay in the model's dtype (weight-only): the weights are what a small card runs out of.

* ``int8``: int8 weights with one scale per output channel.
* ``fp8``: float8 (e4m3) weights with one scale per output channel; 3 mantissa bits, so about four times the int8
  error (docs/memory.md); GPUs with float8 support run it through quanto's kernels, others dequantize.

Why quanto and not torchao (measured here, torch 2.13): once torchao 0.18 is installed, transformers and diffusers
import it at their own import (+0.45 s in every process, and warnings about its compiled extensions that do not
load on a CPU install); quanto is imported only when quantizing, runs both modes on CPUs and GPUs, and gives the
same int8 error as torchao's weight-only int8 on the golden trace (0.34 % rms).

``weight_bytes`` gives the bytes of a model's parameters under each mode from shapes alone (meta device), the
figures of docs/memory.md; a test checks it against what quanto stores.
"""
from __future__ import annotations

from torch import nn

QUANTIZE_MODES = ("none", "int8", "fp8")


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the linear maps ``quantize`` converts: those inside the transformer layers (``blocks.N.``)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("blocks.")]


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize ``model``'s transformer-layer linear maps in place (``mode`` one of ``QUANTIZE_MODES``); returns it.
    Call after the weights are loaded and moved to their device and dtype."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"model.quantize={mode!r} is not one of {QUANTIZE_MODES}")
    if mode == "none":
        return model
    from .extras import require

    require("quant", f"model.quantize={mode}")
    from optimum.quanto import freeze, qfloat8, qint8
    from optimum.quanto import quantize as quanto_quantize

    quanto_quantize(model, weights=qint8 if mode == "int8" else qfloat8, include=quantized_linears(model))
    freeze(model)  # store the quantized weights (and drop the float ones)
    return model


def weight_bytes(model: nn.Module, mode: str) -> int:
    """Bytes of ``model``'s parameters with its transformer-layer linear maps stored as ``mode`` (from shapes, so
    a model on the meta device will do), in quanto's layout: 1 byte per quantized weight plus one scale per output
    channel in the weight's dtype; everything else at its own dtype."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"mode {mode!r} is not one of {QUANTIZE_MODES}")
    targets = {f"{name}.weight" for name in quantized_linears(model)} if mode != "none" else set()
    total = 0
    for name, p in model.named_parameters():
        if name in targets:
            total += p.numel() + p.shape[0] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes the parameters of ``model`` actually hold, quantized tensors counted by their parts (data, scales) and
    each shared tensor once."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        parts = [getattr(p, name) for name in p.__tensor_flatten__()[0]] if hasattr(p, "__tensor_flatten__") else [p]
        total += sum(t.numel() * t.element_size() for t in parts)
    return total
