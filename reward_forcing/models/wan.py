"""Wan2.1 text-to-video DiT, written once for its three roles.

* **bidirectional** (teacher "real score", critic "fake score"): ``model(x, t[B], context)``;
* **streaming** (the causal student at inference and in the self-forcing rollout): a chunk of latent frames
  with per-frame timesteps ``t[B, F]`` against a :class:`~reward_forcing.models.kv_cache.KVCache`:
  ``model(x, t, context, kv_cache=cache, start_frame=f0)``;
* **block-causal** over a whole sequence without a cache (teacher forcing / ODE regression):
  ``model(x, t[B, F], context, causal=True)``; equals streaming the same inputs chunk by chunk.

Parameter names are those of the released checkpoints (``blocks.0.self_attn.q.weight``, ``head.modulation``,
...), so Wan2.1 safetensors, ``ode_init.pt`` and ``rewardforcing.pt`` load without renaming (beyond the
``model.`` prefix, see ``reward_forcing/checkpoints.py``).

Layout: latents ``[B, F, C, H, W]`` (frame-major, the layout of the pipeline, the VAE wrapper and the trainer),
so no caller permutes; the output is the flow ``v = noise - x0`` in the same layout. The patch embedding is the
only place that sees the channel-major layout a Conv3d needs.
Numerics follow the reference (docs/reference.md, Model): sinusoidal time embedding and RoPE in float64, RMSNorm in
float32, everything else in the activation dtype.
"""
from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, frame_block_mask, use_flex_for_masks
from .kv_cache import CacheStep, CausalSpec, KVCache, LayerKV, block_causal_plan


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class WanConfig:
    """Architecture numbers of a Wan2.1 DiT (docs/reference.md, Model)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for the 3-D RoPE split")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_flavor(cls, flavor: str, **overrides) -> "WanConfig":
        if flavor not in WAN_FLAVORS:
            raise ValueError(f"unknown Wan flavor {flavor!r}; choose one of {sorted(WAN_FLAVORS)}")
        return cls(**{**asdict(WAN_FLAVORS[flavor]), **overrides})

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        """Read a Wan2.1 ``config.json`` (HF layout). Fields it lacks (text_dim, patch_size) keep their defaults,
        as the reference does (they are ``ignore_for_config`` there)."""
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


WAN_FLAVORS = {
    # The golden tiny model (tests/golden/wan_tiny_config.json): runs everything on a CPU.
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32),
    # The toy world's DiT (reward_forcing/toy): 3-channel latents that are the pixels, 1x1 patches (a 2x2 patch
    # printed a grid texture on an 8x8 world), three-word prompts. Two heads of 32 channels: the 3-D RoPE gives each
    # spatial axis 5 frequency pairs, of which 1 and 0.16 rad/pixel resolve positions on an 8-pixel frame; 4 heads
    # of 16 gave 2 pairs (1 and 0.01 rad/pixel) and a teacher that drew smeared, split blobs (docs/toy_world.md).
    "toy": WanConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6, in_dim=3, out_dim=3, text_dim=32, text_len=3,
                     patch_size=(1, 1, 1)),
    "1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


# ---------------------------------------------------------------------------------------- embeddings
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """``[cos(t w), sin(t w)]`` with ``w_j = 10000^(-j/half)``, in float64 (raw t in [0, 1000])."""
    half = dim // 2
    t = t.to(torch.float64)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float64).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RotaryEmbedding:
    """3-D RoPE over (frame, row, column) on adjacent channel pairs; head_dim split 44/42/42 for 128.

    Frame positions are given explicitly (window-relative in the streaming cache), so there is no 1024-entry
    table and no length limit. Tables are memoised per (positions, grid, device, precision).

    ``precision`` float64 (default) rotates in complex128 as the reference does (fp32 parity to ~1e-6);
    float32 rotates with real cos/sin tables in float32: several times less memory traffic on a GPU, where the
    float64 path converts every query and the whole key window to float64 on each call (differs by ~1e-6).
    Angles are computed in float64 either way.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, precision: torch.dtype = torch.float64):
        if precision not in (torch.float64, torch.float32):
            raise ValueError(f"RoPE precision must be torch.float64 or torch.float32, got {precision}")
        self.precision = precision
        pairs = head_dim // 2
        self.axis_pairs = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)
        # Each axis has its own exponent base (its own dimension), as in the reference. Pinned to the CPU so a
        # model built under `with torch.device("meta")` (checkpoint loading) still gets real tables.
        self.inv_freq = [
            1.0 / torch.pow(theta, torch.arange(0, 2 * n, 2, dtype=torch.float64, device="cpu").div(2 * n))
            for n in self.axis_pairs
        ]
        self._memo: dict = {}

    def _axis(self, axis: int, positions: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(positions.to(torch.float64), self.inv_freq[axis].to(positions.device))
        return torch.polar(torch.ones_like(angles), angles)

    def freqs(self, frame_positions, height: int, width: int, device) -> torch.Tensor:
        """Rotation table in token order (f, h, w): complex128 ``[L, 1, head_dim/2]`` (float64 precision) or
        float32 ``[L, 1, head_dim/2, 2]`` holding (cos, sin) (float32 precision)."""
        key = (tuple(frame_positions), height, width, str(device), self.precision)
        table = self._memo.get(key)
        if table is None:
            if len(self._memo) > 256:
                self._memo.clear()
            f = len(frame_positions)
            ft = self._axis(0, torch.tensor(list(frame_positions), device=device))
            fh = self._axis(1, torch.arange(height, device=device))
            fw = self._axis(2, torch.arange(width, device=device))
            table = torch.cat([
                ft.view(f, 1, 1, -1).expand(f, height, width, -1),
                fh.view(1, height, 1, -1).expand(f, height, width, -1),
                fw.view(1, 1, width, -1).expand(f, height, width, -1),
            ], dim=-1).reshape(f * height * width, 1, -1)
            if self.precision == torch.float32:
                table = torch.view_as_real(table).to(torch.float32)
            self._memo[key] = table
        return table


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x [B, L, heads, head_dim]`` by a table from RotaryEmbedding.freqs."""
    b, n, h, d = x.shape
    if freqs.is_complex():  # reference numerics: complex128
        rotated = torch.view_as_complex(x.to(torch.float64).reshape(b, n, h, d // 2, 2)) * freqs
        return torch.view_as_real(rotated).flatten(3).type_as(x)
    pairs = x.to(freqs.dtype).reshape(b, n, h, d // 2, 2)
    x0, x1 = pairs.unbind(-1)
    cos, sin = freqs.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)


# -------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32, with a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class _AttentionLayout:
    """How self-attention is wired for one forward call; built once, before the layers, and shared by all.

    Only tensors (and a list of them) live here, so a compiled block is not specialised on any Python value
    that changes from call to call. q_freqs / k_freqs: RoPE tables of the queries and of the keys attended
    (streaming: the keys in the order the cache returns them); sink_groups: (token ids, RoPE table) of each
    re-positioned sink copy of the block-causal mode; mask: its attention mask (None = attend to all).
    """

    def __init__(self, q_freqs: torch.Tensor, k_freqs: torch.Tensor | None = None):
        self.q_freqs, self.k_freqs = q_freqs, k_freqs
        self.sink_groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask: torch.Tensor | None = None


class _Attention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over the full width (the released parameter names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Attention):
    def forward(self, x: torch.Tensor, layout: _AttentionLayout, layer_kv: LayerKV | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).view(heads)
        k = self.norm_k(self.k(x)).view(heads)  # the cache stores keys here: normed, before RoPE
        v = self.v(x).view(heads)
        mask = None
        if layer_kv is not None:  # streaming: attend to sink + window from the cache
            k, v = layer_kv.attend(k, v, lambda keys: apply_rope(keys, layout.q_freqs),
                                   lambda keys: apply_rope(keys, layout.k_freqs))
            q = apply_rope(q, layout.q_freqs)
        else:
            q = apply_rope(q, layout.q_freqs)
            keys, values = [apply_rope(k, layout.k_freqs)], [v]
            for tokens, freqs in layout.sink_groups:  # block-causal: the sink re-positioned per query block
                keys.append(apply_rope(k.index_select(1, tokens), freqs))
                values.append(v.index_select(1, tokens))
            k, v, mask = torch.cat(keys, 1), torch.cat(values, 1), layout.mask
        return self.o(attention(q, k, v, mask).flatten(2))


class CrossAttention(_Attention):
    """Attention from video tokens to the 512 embedded text rows (no RoPE, no mask: padding rows included)."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(context).view(b, n, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, kv=None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        k, v = kv if kv is not None else self.context_kv(context)
        return self.o(attention(q, k, v).flatten(2))


class WanLayer(nn.Module):
    """Modulated self-attention, cross-attention, modulated FFN (docs/reference.md, Model)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, layout, layer_kv=None, context_kv=None):
        """x ``[B, L, dim]``; e0 ``[B, G, 6, dim]``: one modulation per group of L/G tokens (a frame, or all)."""
        groups = e0.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)

        def grouped(t):  # [B, L, dim] -> [B, G, L/G, dim] to broadcast per-group modulation
            return t.unflatten(1, (groups, -1))

        y = self.self_attn((grouped(self.norm1(x)) * (1 + scale1) + shift1).flatten(1, 2), layout, layer_kv)
        x = x + (grouped(y) * gate1).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), context, context_kv)
        y = self.ffn((grouped(self.norm2(x)) * (1 + scale2) + shift2).flatten(1, 2))
        return x + (grouped(y) * gate2).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, dim]``; e ``[B, G, dim]`` (the time embedding before the 6-way projection)."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        x = self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale) + shift
        return self.head(x).flatten(1, 2)


@dataclass
class TextContext:
    """Embedded text (``[B, text_len, dim]``) plus, for inference, each layer's cross-attention K/V.

    Built by :meth:`WanModel.prepare_context` once per prompt; reusing it skips the text MLP and the
    cross-attention projections on every call. Do not reuse it under grad: its K/V are detached from the
    weights that produced them.
    """

    embedded: torch.Tensor
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class ForwardPlan:
    """What the layers of one forward call share (:meth:`WanModel.plan_forward`): the patch-embedded ``tokens``
    ``[B, L, dim]`` on the patch ``grid`` (f, h, w), the time embedding ``e`` and its 6-way projection ``e0``, the
    embedded ``text`` and the held layers' cross-attention K/V (``context_kv``, may be empty), the attention
    ``layout``, and in streaming mode the cache and its ``step`` for this call."""

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    e: torch.Tensor
    e0: torch.Tensor
    text: torch.Tensor
    context_kv: list[tuple[torch.Tensor, torch.Tensor]]
    layout: _AttentionLayout
    kv_cache: KVCache | None = None
    step: CacheStep | None = None


# ------------------------------------------------------------------------------------------- model
COMPILE_FALLBACKS = ("error", "eager")
# Graphs one compiled model may hold: one per attention shape it meets (3 per streamed resolution with the
# shipped cache, one per chunk with global attention, one per input shape for the other modes). Per model,
# not process-wide; past it a compile fails like any other (an error, or eager with compile_fallback=eager).
COMPILE_GRAPH_LIMIT = 64
# torch.compile's per-function recompile budget (isolate_recompiles / recompile_limit) is new in torch 2.13
_TORCH_COMPILE_HAS_OWN_LIMIT = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _call_layer(block: WanLayer, x, e0, text, layout, layer_kv, context_kv) -> torch.Tensor:
    """One block call: the region :meth:`WanModel.compile_layers` compiles, shared by every layer."""
    return block(x, e0, text, layout, layer_kv, context_kv)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions by which torch.compile reports that it could not compile (not errors of the model)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    return TorchDynamoException, FailOnRecompileLimitHit


class WanModel(nn.Module):
    """The Wan2.1 DiT. See the module docstring for the three call modes."""

    def __init__(self, config: WanConfig, causal: CausalSpec | None = None):
        super().__init__()
        self.config = config
        self.causal = causal or CausalSpec()
        self.gradient_checkpointing = False
        cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        # The transformer layers. Named `blocks` because every Wan checkpoint's keys are (`blocks.N.*`); in this
        # code base a "block" is a block of latent frames, a layer is one of these.
        self.blocks = nn.ModuleList(WanLayer(cfg) for _ in range(cfg.num_layers))
        self.held_layers = range(cfg.num_layers)  # a pipeline stage holds a slice (hold_layers)
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim)  # plain attribute: no tensor in the state dict
        self._compiled_layer = None  # see compile_layers
        self._compiled_region = (None, None)  # (compiled callable, its (mode, backend)), kept across uncompile
        self.compile_fallback = "error"
        self.compile_failures: list[str] = []

    # ---------------------------------------------------------------------------------- utilities
    @classmethod
    def from_flavor(cls, flavor: str, causal: CausalSpec | None = None, **overrides) -> "WanModel":
        return cls(WanConfig.from_flavor(flavor, **overrides), causal)

    def compile_layers(self, mode: str | None = None, *, backend: str | Callable = "inductor",
                       fallback: str = "error") -> "WanModel":
        """``torch.compile`` the transformer block once, for every layer (embeddings, head and the cache
        bookkeeping stay eager). Undo with :meth:`uncompile_layers`.

        All layers call one compiled region: a layer's weights and its slice of the KV cache reach it as
        tensors, and whatever changes per call is planned before the layers run (``KVCache.begin``), so the
        number of graphs does not grow with depth or video length. It is one graph per attention shape:
        streaming, one per window length while the ring fills (3 for the shipped 9-frame window and 3-frame
        chunks; the denoising steps and the context pass of a chunk share it), plus one per input shape for the
        bidirectional and block-causal modes. Graph breaks are errors (``fullgraph``), and no process-wide
        setting is touched: the region keeps its own budget of ``COMPILE_GRAPH_LIMIT`` graphs.

        mode: a ``torch.compile`` mode: ``default``, ``reduce-overhead``, ``max-autotune`` (both with CUDA
        graphs on a GPU: a chunk's repeated calls pass identical tensors at fixed addresses), ...
        backend: ``inductor``, or e.g. ``aot_eager`` / ``eager`` to check tracing cheaply.
        fallback: ``error`` (default) raises when compiling fails; ``eager`` warns, naming the cause, and
        runs the blocks eager from then on (the cause is kept in ``compile_failures``).
        """
        if fallback not in COMPILE_FALLBACKS:
            raise ValueError(f"compile fallback {fallback!r} is not one of {COMPILE_FALLBACKS}")
        region, settings = self._compiled_region
        if region is None or settings != (mode, backend):  # else re-enable what is already compiled
            options = {} if mode is None else {"mode": mode}
            if _TORCH_COMPILE_HAS_OWN_LIMIT:
                options.update(isolate_recompiles=True, recompile_limit=COMPILE_GRAPH_LIMIT)
            # else (torch < 2.13): dynamo's process-wide recompile limit (8) still covers the 3 streaming graphs
            region = torch.compile(_call_layer, backend=backend, dynamic=False, fullgraph=True, **options)
            self._compiled_region = (region, (mode, backend))
        self._compiled_layer = region
        self.compile_fallback = fallback
        return self

    def uncompile_layers(self) -> "WanModel":
        """Run the blocks eager again (compile_layers with the same mode and backend re-enables the graphs
        already compiled)."""
        self._compiled_layer = None
        return self

    @property
    def layers_compiled(self) -> bool:
        """Whether the blocks run compiled (False before compile_layers and after an eager fallback)."""
        return self._compiled_layer is not None

    def _run_compiled(self, *args) -> torch.Tensor:
        if self._compiled_layer is None:  # fell back to eager earlier in this call
            return _call_layer(*args)
        if self.compile_fallback == "error":
            return self._compiled_layer(*args)
        try:
            return self._compiled_layer(*args)
        except _compile_errors() as err:
            message = " ".join(str(err).split())  # dynamo's messages span lines: one line, the cause first
            cause = f"{type(err).__name__}: {message[:400]}"
            warnings.warn(f"torch.compile of the Wan blocks failed ({cause}); running them eager "
                          "(compile_fallback=eager)", RuntimeWarning, stacklevel=3)
            self.compile_failures.append(cause)
            self._compiled_layer = None
            return _call_layer(*args)

    def hold_layers(self, start: int, stop: int) -> "WanModel":
        """Keep only the transformer layers ``[start, stop)`` (a pipeline stage): the others become parameterless
        placeholders, so neither their weights nor their KV cache or cross-attention K/V exist here. The
        checkpoint keys of the layers kept are unchanged (``blocks.N.*``)."""
        if not 0 <= start < stop <= self.config.num_layers:
            raise ValueError(f"layers [{start}, {stop}) are not a non-empty range of the model's "
                             f"{self.config.num_layers} layers")
        for i in range(self.config.num_layers):
            if not start <= i < stop:
                self.blocks[i] = nn.Identity()
        self.held_layers = range(start, stop)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "WanModel":
        self.gradient_checkpointing = enabled
        return self

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens per latent frame of size ``height x width`` (1560 for 60x104 with a 2x2 patch)."""
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch {ph}x{pw}")
        return (height // ph) * (width // pw)

    def new_kv_cache(self, batch_size: int, height: int, width: int, *, max_frames: int | None = None,
                     spec: CausalSpec | None = None, device=None, dtype=None, rotated_keys: bool = True) -> KVCache:
        """A streaming cache for latents of ``height x width`` (latent pixels); see ``KVCache`` for
        ``rotated_keys``."""
        return KVCache.for_model(self, batch_size=batch_size, frame_tokens=self.tokens_per_frame(height, width),
                                 spec=spec, max_frames=max_frames, device=device, dtype=dtype,
                                 rotated_keys=rotated_keys)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, L <= text_len, text_dim]`` -> zero-pad to ``text_len`` rows -> text MLP -> ``[B, text_len, dim]``."""
        b, n, d = context.shape
        if n > self.config.text_len:
            raise ValueError(f"context has {n} rows; the model takes at most text_len={self.config.text_len}")
        if d != self.config.text_dim:
            raise ValueError(f"context width {d} != text_dim {self.config.text_dim} of this model")
        if n < self.config.text_len:
            context = torch.cat([context, context.new_zeros(b, self.config.text_len - n, d)], dim=1)
        return self.text_embedding(context)

    def prepare_context(self, context: torch.Tensor, out: TextContext | None = None) -> TextContext:
        """Embed the text and precompute every layer's cross-attention K/V (inference, once per prompt).

        With ``out`` (a previous result of the same shape) the values are written into its buffers, so a
        streaming session allocates its cross-attention cache once.
        """
        embedded = self.embed_text(context)
        fresh = TextContext(embedded, [self.blocks[i].cross_attn.context_kv(embedded) for i in self.held_layers])
        if out is None or out.embedded.shape != embedded.shape or out.embedded.dtype != embedded.dtype \
                or out.embedded.device != embedded.device:
            return fresh
        out.embedded.copy_(embedded)
        for (k, v), (new_k, new_v) in zip(out.layer_kv, fresh.layer_kv):
            k.copy_(new_k)
            v.copy_(new_v)
        return out

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | TextContext,
        *,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        causal: bool = False,
    ) -> torch.Tensor:
        """Predict the flow for latents ``x [B, F, C, H, W]``.

        timestep: ``[B]`` (one per sample) or ``[B, F]`` (per latent frame), raw values in [0, 1000].
        context: text-encoder output ``[B, L, text_dim]`` or a :class:`TextContext`.
        kv_cache / start_frame: streaming mode; ``x`` holds frames ``[start_frame, start_frame + F)``.
        causal: block-causal attention over the whole sequence (``self.causal`` gives block/window/sink).
        Returns the flow ``[B, F, out_dim, H, W]``.

        Three steps, public so that a pipeline stage (``reward_forcing/pipeline_parallel.py``) can run its own
        layers between them: :meth:`plan_forward`, :meth:`run_layers`, :meth:`output`.
        """
        plan = self.plan_forward(x, timestep, context, kv_cache=kv_cache, start_frame=start_frame, causal=causal)
        return self.output(self.run_layers(plan.tokens, plan), plan)

    def plan_forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | TextContext, *,
                     kv_cache: KVCache | None = None, start_frame: int = 0, causal: bool = False) -> ForwardPlan:
        """Everything the layers of one call share: the patch-embedded tokens, time and text embeddings, the
        attention layout and (streaming) the cache's plan for this call, made once for all layers."""
        if kv_cache is not None and causal:
            raise ValueError("pass either kv_cache (streaming) or causal=True (whole sequence), not both")
        b = x.shape[0]
        x = self.patch_embedding(x.transpose(1, 2))  # Conv3d wants [B, C, F, H, W]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)

        if timestep.dim() == 1:
            timestep = timestep[:, None]  # one modulation for all tokens
        elif timestep.shape[1] != grid[0]:
            raise ValueError(f"per-frame timesteps have {timestep.shape[1]} entries for {grid[0]} latent frames")
        groups = timestep.shape[1]
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, timestep.flatten()).type_as(x))
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim)).unflatten(0, (b, groups))
        e = e.unflatten(0, (b, groups))

        if isinstance(context, TextContext):
            text, context_kv = context.embedded, context.layer_kv
        else:
            text, context_kv = self.embed_text(context), []

        def freqs(frame_positions) -> torch.Tensor:
            return self.rope.freqs(frame_positions, grid[1], grid[2], x.device)

        step = None
        if kv_cache is not None:
            if kv_cache.batch_size != b:
                raise ValueError(f"KV cache was allocated for batch {kv_cache.batch_size}, got a batch of {b}")
            if kv_cache.num_layers != len(self.held_layers):
                raise ValueError(f"KV cache holds {kv_cache.num_layers} layers; this model runs "
                                 f"{len(self.held_layers)} (allocate it with new_kv_cache)")
            if self._compiled_layer is not None:
                kv_cache.mark_static_addresses()
            step = kv_cache.begin(start_frame, grid[0])
            layout = _AttentionLayout(freqs(step.query_positions))
            if step.snapshot or kv_cache.k_rotated is None:  # the layers rotate every key they attend
                layout.k_freqs = freqs(step.key_positions)
            if step.refresh_rotated:  # new positions: rotate every layer's past keys once, here
                past_freqs = freqs(step.past_positions) if step.past_slots else None  # None: nothing to rotate
                kv_cache.rotate_past(step, lambda keys: apply_rope(keys, past_freqs))
        elif causal:
            layout = self._block_causal_layout(grid, x.device)
        else:
            layout = _AttentionLayout(freqs(range(grid[0])), freqs(range(grid[0])))
        return ForwardPlan(x, grid, e, e0, text, context_kv, layout, kv_cache, step)

    def run_layers(self, x: torch.Tensor, plan: ForwardPlan, rows: slice = slice(None)) -> torch.Tensor:
        """Run the layers this model holds (:attr:`held_layers`) on tokens ``x [b, L, dim]``, which are the batch
        rows ``rows`` of the call ``plan`` describes (a pipeline stage's micro-batch; all rows by default)."""
        run = self._run_compiled if self._compiled_layer is not None else _call_layer
        e0, text = plan.e0[rows], plan.text[rows]
        for j, i in enumerate(self.held_layers):  # j: the layer's place in the cache and the text K/V
            layer = self.blocks[i]
            layer_kv = plan.kv_cache.layer(j, plan.step).rows(rows) if plan.kv_cache is not None else None
            ckv = tuple(t[rows] for t in plan.context_kv[j]) if plan.context_kv else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, e0, text, plan.layout, layer_kv, ckv, use_reentrant=False)
            else:
                x = run(layer, x, e0, text, plan.layout, layer_kv, ckv)
            if layer_kv is not None:
                layer_kv.commit()
        return x

    def output(self, x: torch.Tensor, plan: ForwardPlan, rows: slice = slice(None)) -> torch.Tensor:
        """The head on the last layer's tokens of batch rows ``rows``: the flow ``[b, F, out_dim, H, W]``."""
        return self.unpatchify(self.head(x, plan.e[rows]), plan.grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, prod(patch)*C]`` -> ``[B, f*pt, C, h*ph, w*pw]``."""
        b, c = x.shape[0], self.config.out_dim
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.view(b, f, h, w, pt, ph, pw, c)
        return torch.einsum("bfhwpqrc->bfpchqwr", x).reshape(b, f * pt, c, h * ph, w * pw)

    def _block_causal_layout(self, grid: tuple[int, int, int], device) -> _AttentionLayout:
        """The block-causal plan of ``kv_cache.block_causal_plan`` in tokens: queries and keys at absolute
        frame positions, one re-positioned copy of the sink per chunk, and the token-level mask (dense, or a
        flex ``BlockMask`` that skips masked tiles)."""
        f, h, w = grid
        tokens = h * w
        plan = block_causal_plan(self.causal, f)
        freqs = self.rope.freqs(range(f), h, w, device)
        layout = _AttentionLayout(freqs, freqs)
        frame_tokens = torch.arange(tokens, device=device)
        for copy in plan.sink_copies:
            token_ids = (torch.tensor(copy.frames, device=device)[:, None] * tokens + frame_tokens).reshape(-1)
            layout.sink_groups.append((token_ids, self.rope.freqs(copy.positions, h, w, device)))
        if use_flex_for_masks(device):
            layout.mask = frame_block_mask(plan.frame_mask, tokens, device)
        else:
            layout.mask = plan.frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1).to(device)
        return layout


# ------------------------------------------------------------------------------------ initialisers
@torch.no_grad()
def init_weights_(model: WanModel) -> WanModel:
    """The reference initialisation: Xavier Linear/patch weights, zero biases, N(0, .02) embeddings,
    zero head weight - so a fresh model predicts flow 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    for seq in (model.text_embedding, model.time_embedding):
        for m in seq.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
    nn.init.zeros_(model.head.head.weight)
    return model


@torch.no_grad()
def init_random_(model: WanModel, seed: int = 0) -> WanModel:
    """A non-degenerate random init for tiny test/debug models (the golden files' rules): modulation N(0, .2^2),
    norm weights 1 + N(0, .1^2), biases N(0, .05^2), other weights N(0, 1/fan_in). Unlike the reference init it
    does not zero the head, so predictions depend on every input. Values are drawn on each parameter's device
    (one seeded generator per device), so a real-size model materialised on a GPU is filled there."""
    rngs: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        rng = rngs.get(p.device)
        if rng is None:
            rng = rngs[p.device] = torch.Generator(device=p.device).manual_seed(seed)

        def randn() -> torch.Tensor:
            return torch.randn(p.shape, generator=rng, device=p.device)

        if name.endswith("modulation"):
            values = randn() * 0.2
        elif "norm" in name and name.endswith("weight"):
            values = 1 + randn() * 0.1
        elif name.endswith("bias"):
            values = randn() * 0.05
        else:
            values = randn() / math.sqrt(p[0].numel())
        p.copy_(values.to(p.dtype))
    return model
