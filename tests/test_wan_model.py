"""WanModel: released checkpoint keys, golden parity (bidirectional + every call of the causal trace),
block-causal == streaming, gradient checkpointing, dtypes, and diffusers' WanTransformer3DModel as an oracle."""
import csv

import pytest
import torch

from reward_forcing.models.kv_cache import CausalSpec
from reward_forcing.models.wan import WanConfig, WanModel, init_random_
from reward_forcing.schedule import FlowMatchSchedule
from conftest import PARITY_ATOL, golden_path, load_golden

TOL = PARITY_ATOL  # fp32 parity with the reference, from the fp32 noise floor (tests/conftest.py)


def bfchw(x):  # pipeline layout [B, F, C, H, W] <-> DiT layout [B, C, F, H, W]
    return x.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("flavor,name,params", [("1.3B", "Wan2.1-T2V-1.3B", 1_418_996_800),
                                                ("14B", "Wan2.1-T2V-14B", 14_288_491_584)])
def test_parameter_names_and_shapes_match_released_checkpoints(flavor, name, params):
    with golden_path("checkpoint_keys.tsv").open() as fh:
        expected = {row["key"]: tuple(int(d) for d in row["shape"].split(","))
                    for row in csv.DictReader(fh, delimiter="\t") if row["model"] == name}
    with torch.device("meta"):
        model = WanModel.from_flavor(flavor)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(expected), (sorted(set(ours) ^ set(expected)))[:10]
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == params


def test_no_hardcoded_geometry():
    with torch.device("meta"):
        model = WanModel.from_flavor("1.3B")
    assert model.tokens_per_frame(60, 104) == 1560 and model.tokens_per_frame(6, 10) == 15
    assert WanConfig.from_flavor("1.3B").head_dim == 128 and len(model.blocks) == 30
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model.tokens_per_frame(5, 10)


def test_bidirectional_forward_matches_golden(golden_dir, golden_tiny_model):
    io = load_golden(golden_dir, "bidirectional_forward.safetensors")
    with torch.no_grad():
        # The golden bidirectional tensors are in the channel-major [B, C, F, H, W] layout.
        flow = bfchw(golden_tiny_model(bfchw(io["x"]), io["t"], io["context"]))
    assert flow.shape == io["flow_pred"].shape
    assert (flow - io["flow_pred"]).abs().max() <= TOL
    x0 = FlowMatchSchedule(8).flow_to_x0(flow, io["x"], io["t"])  # the teacher/critic wrappers' shift-8 grid
    assert (x0 - io["x0_pred_wrapper_shift8"]).abs().max() <= TOL


def test_causal_trace_every_call_matches_golden(golden_tiny_model, golden_trace):
    """All 35 generator calls of the reference's 7-block run (4 denoising + 1 context pass per block), in
    order, through our model and cache: window membership, window-relative RoPE, EMA-Sink and x0."""
    model, tr = golden_tiny_model, golden_trace
    sched = FlowMatchSchedule(5)
    cache = model.new_kv_cache(1, 6, 10)
    worst = 0.0
    with torch.no_grad():
        for call in range(35):
            key = f"call{call:03d}."
            x = tr[key + "input"]
            start_frame = int(tr[key + "current_start"]) // model.tokens_per_frame(6, 10)
            flow = model(x, tr[key + "timestep"], tr["context"], kv_cache=cache, start_frame=start_frame)
            x0 = sched.flow_to_x0(flow, x, tr[key + "timestep"])
            worst = max(worst, (flow - tr[key + "flow_pred"]).abs().max().item(),
                        (x0 - tr[key + "x0_pred"]).abs().max().item())
            if call in (15, 20, 25, 30):  # the EMA-Sink updates (blocks 3..6), both layers
                update = (call - 15) // 5
                for layer in range(2):
                    sink_k, sink_v = cache.sink_kv(layer)
                    prefix = f"sink.layer{layer}.update{update:02d}."
                    assert (sink_k - tr[prefix + "sink_k_after"]).abs().max() <= TOL  # an update moves it ~5e-3
                    assert (sink_v - tr[prefix + "sink_v_after"]).abs().max() <= TOL
    assert worst <= TOL, worst
    assert cache.num_sink_updates == 4 and cache.end_frame == 21


@pytest.fixture
def random_tiny():
    model = init_random_(WanModel.from_flavor("tiny", num_layers=2), seed=1)
    return model.eval()


def stream_blocks(model, x, t, context, spec, block=3):
    """Streaming mode, one call per chunk on the given inputs (no context pass)."""
    cache = model.new_kv_cache(x.shape[0], x.shape[3], x.shape[4], spec=spec, max_frames=x.shape[1])
    outs = [model(x[:, s:s + block], t[:, s:s + block], context, kv_cache=cache, start_frame=s)
            for s in range(0, x.shape[1], block)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("spec", [
    CausalSpec(sink_policy="static"),  # the reference's training pattern: 3-frame sink + 6-frame window
    CausalSpec(sink_policy="none", local_attn_size=6),  # plain sliding window
    CausalSpec(sink_size=0, local_attn_size=6),  # sink_size 0: broken in the reference
    CausalSpec(local_attn_size=-1),  # global causal attention
    CausalSpec(frames_per_block=2, local_attn_size=7, sink_size=3, sink_policy="static"),  # chunk != sink
    CausalSpec(sink_policy="static", local_attn_size=12, rope_positions="absolute"),  # LongLive's pattern
    CausalSpec(frames_per_block=1, local_attn_size=-1, sink_size=0, sink_policy="none",
               rope_positions="absolute"),  # Causal Forcing, frame-wise
], ids=["static-sink", "none", "sink0", "global", "chunk2-sink3", "absolute-sink", "framewise-global"])
def test_block_causal_equals_streaming(random_tiny, spec):
    torch.manual_seed(0)
    f = 15
    x, ctx = torch.randn(2, f, 16, 4, 6), torch.randn(2, 5, 32)
    t = torch.rand(2, f) * 1000
    random_tiny.causal = spec
    with torch.no_grad():
        full = random_tiny(x, t, ctx, causal=True)
        streamed = stream_blocks(random_tiny, x, t, ctx, spec, spec.frames_per_block)
    assert (full - streamed).abs().max() <= 1e-5
    # ... and it is causal: changing the last block leaves earlier frames untouched.
    x2 = x.clone()
    x2[:, -3:] += 1
    with torch.no_grad():
        full2 = random_tiny(x2, t, ctx, causal=True)
    assert torch.equal(full2[:, :12], full[:, :12]) or (full2[:, :12] - full[:, :12]).abs().max() < 1e-6
    assert (full2[:, 12:] - full[:, 12:]).abs().max() > 1e-3


def test_absolute_positions_agree_with_window_ones_until_the_first_eviction(random_tiny):
    torch.manual_seed(0)
    x, ctx, t = torch.randn(1, 15, 16, 4, 6), torch.randn(1, 5, 32), torch.full((1, 15), 500.0)
    with torch.no_grad():
        window = stream_blocks(random_tiny, x, t, ctx, CausalSpec(sink_policy="static"))
        absolute = stream_blocks(random_tiny, x, t, ctx, CausalSpec(sink_policy="static", rope_positions="absolute"))
    assert torch.equal(window[:, :9], absolute[:, :9])  # 9 frames fit the window: the same positions
    assert (window[:, 9:] - absolute[:, 9:]).abs().max() > 1e-3  # after: ranks 6..8 vs frame indices 9..14


def test_ema_sink_changes_streaming_after_eviction(random_tiny):
    """With evictions, EMA and static sinks differ (by a small amount at alpha 0.999); before, they agree."""
    x, ctx, t = torch.randn(1, 15, 16, 4, 6), torch.randn(1, 5, 32), torch.full((1, 15), 500.0)
    with torch.no_grad():
        ema = stream_blocks(random_tiny, x, t, ctx, CausalSpec(ema_alpha=0.9))
        static = stream_blocks(random_tiny, x, t, ctx, CausalSpec(sink_policy="static"))
    assert torch.equal(ema[:, :9], static[:, :9])
    assert (ema[:, 9:] - static[:, 9:]).abs().max() > 1e-4


def _grads(model, fn):
    model.zero_grad()
    fn().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal", "streaming_rollout"])
def test_gradient_checkpointing_gives_equal_gradients(random_tiny, mode):
    torch.manual_seed(0)
    x, ctx, t = torch.randn(1, 9, 16, 4, 6), torch.randn(1, 5, 32), torch.rand(1, 9) * 1000
    random_tiny.causal = CausalSpec(sink_policy="static", local_attn_size=6)

    def run():
        if mode == "bidirectional":
            return random_tiny(x, t[:, 0], ctx)
        if mode == "block_causal":
            return random_tiny(x, t, ctx, causal=True)
        # Self-forcing style: earlier chunks fill the cache without grad, the last chunk carries grad.
        cache = random_tiny.new_kv_cache(1, 4, 6)
        with torch.no_grad():
            for s in (0, 3):
                random_tiny(x[:, s:s + 3], t[:, s:s + 3], ctx, kv_cache=cache, start_frame=s)
        return random_tiny(x[:, 6:], t[:, 6:], ctx, kv_cache=cache, start_frame=6)

    plain = _grads(random_tiny.enable_gradient_checkpointing(False), run)
    ckpt = _grads(random_tiny.enable_gradient_checkpointing(True), run)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(random_tiny.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_grad_enabled_streaming_equals_no_grad(random_tiny):
    """The snapshot path (grad) and the in-place path (inference) produce the same outputs and cache."""
    x, ctx, t = torch.randn(1, 12, 16, 4, 6), torch.randn(1, 5, 32), torch.full((1, 12), 700.0)
    with torch.no_grad():
        ref = stream_blocks(random_tiny, x, t, ctx, random_tiny.causal)
    with torch.enable_grad():
        out = stream_blocks(random_tiny, x, t, ctx, random_tiny.causal)
    assert out.requires_grad
    assert (out.detach() - ref).abs().max() <= 1e-5  # keys in another order: summation order only


def test_bf16_on_cpu_keeps_dtype_and_stays_close(random_tiny):
    x, ctx, t = torch.randn(1, 6, 16, 4, 6), torch.randn(1, 5, 32), torch.full((1, 6), 800.0)
    with torch.no_grad():
        ref = stream_blocks(random_tiny, x, t, ctx, random_tiny.causal)
        model = random_tiny.to(torch.bfloat16)
        out = stream_blocks(model, x.bfloat16(), t, ctx.bfloat16(), model.causal)
        bidir = model(x.bfloat16(), t[:, 0], ctx.bfloat16())
    assert out.dtype == torch.bfloat16 and bidir.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_prepared_context_equals_raw_context(random_tiny):
    x, ctx, t = torch.randn(1, 3, 16, 4, 6), torch.randn(1, 5, 32), torch.full((1, 3), 900.0)
    with torch.no_grad():
        prepared = random_tiny.prepare_context(ctx)
        a = random_tiny(x, t, ctx, kv_cache=random_tiny.new_kv_cache(1, 4, 6), start_frame=0)
        b = random_tiny(x, t, prepared, kv_cache=random_tiny.new_kv_cache(1, 4, 6), start_frame=0)
    assert torch.equal(a, b)


def test_input_errors(random_tiny):
    x = torch.randn(1, 3, 16, 4, 6)
    with pytest.raises(ValueError, match="text_dim 32"):
        random_tiny(x, torch.tensor([500.0]), torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="3 latent frames"):
        random_tiny(x, torch.full((1, 2), 500.0), torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="not both"):
        random_tiny(x, torch.full((1, 3), 500.0), torch.randn(1, 5, 32), kv_cache=random_tiny.new_kv_cache(1, 4, 6),
                    causal=True)


def test_matches_diffusers_wan_transformer(golden_dir, golden_tiny_model):
    """diffusers' independent Wan implementation as an oracle for the bidirectional mode."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    cfg = golden_tiny_model.config
    oracle = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps).eval()
    converted = convert_wan_transformer_to_diffusers(dict(golden_tiny_model.state_dict()))
    oracle.load_state_dict(converted, strict=True)
    io = load_golden(golden_dir, "bidirectional_forward.safetensors")
    padded = torch.cat([io["context"], io["context"].new_zeros(2, cfg.text_len - io["context"].shape[1], 32)], 1)
    with torch.no_grad():
        theirs = oracle(io["x"], io["t"], padded, return_dict=False)[0]
        ours = bfchw(golden_tiny_model(bfchw(io["x"]), io["t"], io["context"]))
    # diffusers computes the sinusoidal time embedding in float32 where the reference (and we) use float64:
    # that alone moves the golden outputs by ~2.6e-5 (tests/golden/README.md), so allow it on top of the parity
    # tolerance. A semantic difference would be >= 2e-4.
    assert (theirs - ours).abs().max() <= 2 * TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU on purpose
def test_flex_attention_block_causal_equals_dense_mask(random_tiny):
    """FlexAttention with a block mask (the GPU path) gives the dense-mask SDPA result (forward; CPU flex
    has no backward)."""
    from reward_forcing.models import attention as attn

    x, ctx, t = torch.randn(1, 9, 16, 4, 6), torch.randn(1, 5, 32), torch.rand(1, 9) * 1000
    random_tiny.causal = CausalSpec(sink_policy="static", local_attn_size=6)
    with torch.no_grad():
        dense = random_tiny(x, t, ctx, causal=True)
        attn.set_attention_backend("flex")
        try:
            flex = random_tiny(x, t, ctx, causal=True)
        finally:
            attn.set_attention_backend("auto")
    assert (flex - dense).abs().max() <= 1e-5


def test_float32_rope_matches_float64_on_the_golden_trace(golden_tiny_model, golden_trace):
    """The fast RoPE switch stays within fp32 rounding of the reference numerics over all 35 calls."""
    golden_tiny_model.rope.precision = torch.float32
    tr, cache, worst = golden_trace, golden_tiny_model.new_kv_cache(1, 6, 10), 0.0
    with torch.no_grad():
        for call in range(35):
            key = f"call{call:03d}."
            flow = golden_tiny_model(tr[key + "input"], tr[key + "timestep"], tr["context"], kv_cache=cache,
                                     start_frame=int(tr[key + "current_start"]) // 15)
            worst = max(worst, (flow - tr[key + "flow_pred"]).abs().max().item())
    assert worst <= TOL


# The reference-numerics RoPE rotates in complex128, which inductor leaves to ATen kernels (and says so).
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_compiled_blocks_equal_eager(random_tiny):
    """torch.compile with the real inductor backend (the inference speed switch) leaves streaming outputs
    unchanged (fp32, CPU). Compilation must really happen: the region is fullgraph with no eager fallback
    (fallback="error", suppress_errors off), so a failed compile raises instead of comparing eager with eager;
    dynamo captures exactly one graph per window length (3 and 6 frames with a 6-frame window) for both layers
    and every call; and no process-wide dynamo setting is left changed. tests/test_compile.py checks the
    graphs at depth 30."""
    import torch._dynamo

    from reward_forcing.compile import CompileCounters

    settings = torch._dynamo.config.get_config_copy()
    random_tiny.causal = CausalSpec(local_attn_size=6)  # two window lengths: two graphs to compile, not three
    x, ctx = torch.randn(1, 12, 16, 4, 6), random_tiny.prepare_context(torch.randn(1, 5, 32))

    def run():
        cache = random_tiny.new_kv_cache(1, 4, 6)
        outs = []
        with torch.no_grad():
            for start in (0, 3, 6, 9):  # the third and fourth chunks evict and fold the EMA sink
                for t in (1000.0, 625.0, 0.0):
                    outs.append(random_tiny(x[:, start:start + 3], torch.full((1, 3), t), ctx, kv_cache=cache,
                                            start_frame=start))
        return torch.cat(outs, 1)

    eager = run()
    before = CompileCounters.read()
    try:
        random_tiny.compile_layers()
        compiled = run()
        assert random_tiny.layers_compiled and not random_tiny.compile_failures
    finally:
        random_tiny.uncompile_layers()
    counts = CompileCounters.read() - before
    assert counts.graphs == 2 and counts.graph_breaks == 0
    assert not torch._dynamo.config.suppress_errors and torch._dynamo.config.get_config_copy() == settings
    # Inductor reorders fp32 sums: allow the fp32 noise floor relative to the outputs' magnitude.
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()


def test_full_size_geometry_on_the_meta_device():
    """The 1.3B student streams at 480x832 (60x104 latents, 1560 tokens/frame) and the 14B teacher runs
    bidirectionally: every shape at real size, no compute (meta tensors)."""
    with torch.device("meta"):
        student = WanModel.from_flavor("1.3B").to(torch.bfloat16)
        teacher = WanModel.from_flavor("14B").to(torch.bfloat16)
    cache = student.new_kv_cache(1, 60, 104)
    assert tuple(cache.k.shape) == (30, 1, 9 * 1560, 12, 128)  # the reference's 14040-token inference cache
    x = torch.empty(1, 3, 16, 60, 104, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 512, 4096, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        for start in range(0, 15, 3):
            for t in (1000.0, 0.0):
                out = student(x, torch.full((1, 3), t, device="meta"), ctx, kv_cache=cache, start_frame=start)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert cache.window_frames() == [0, 1, 2, 9, 10, 11, 12, 13, 14] and cache.num_sink_updates == 2
        assert teacher(x, torch.full((1,), 500.0, device="meta"), ctx).shape == x.shape


def test_reference_init_predicts_zero_flow():
    """Reference init zeroes the head (docs/reference.md, Model): a fresh model predicts flow = bias only."""
    from reward_forcing.models.wan import init_weights_

    model = init_weights_(WanModel.from_flavor("tiny"))
    assert model.head.head.weight.abs().sum() == 0 and model.head.head.bias.abs().sum() == 0
    with torch.no_grad():
        flow = model(torch.randn(1, 3, 16, 4, 6), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert torch.equal(flow, torch.zeros_like(flow))
    assert model.blocks[0].self_attn.q.bias.abs().sum() == 0 and model.blocks[0].self_attn.q.weight.std() > 0


def test_rotated_key_cache_is_bit_identical(golden_tiny_model, golden_trace):
    """Keeping rotated keys per block (the default) gives exactly the outputs of re-rotating every call."""
    tr, outs = golden_trace, {}
    for rotated in (True, False):
        cache = golden_tiny_model.new_kv_cache(1, 6, 10, rotated_keys=rotated)
        assert (cache.k_rotated is not None) == rotated
        with torch.no_grad():
            outs[rotated] = [golden_tiny_model(tr[f"call{c:03d}.input"], tr[f"call{c:03d}.timestep"],
                                               tr["context"], kv_cache=cache,
                                               start_frame=int(tr[f"call{c:03d}.current_start"]) // 15)
                             for c in range(35)]
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))


def test_rotated_key_cache_after_a_grad_enabled_call(random_tiny):
    """Rollout order: a chunk's first call carries grad (exit step 0), then a no-grad context pass. The
    rotated-key buffer must be refreshed, not reused from the previous chunk's positions."""
    # A 6-frame window slides from the third chunk on, so stale rotations would show (~1e-3 without the fix).
    random_tiny.causal = CausalSpec(local_attn_size=6)
    x, ctx = torch.randn(1, 12, 16, 4, 6), torch.randn(1, 5, 32)
    outs = {}
    for rotated in (True, False):
        cache = random_tiny.new_kv_cache(1, 4, 6, rotated_keys=rotated)
        results = []
        for start in (0, 3, 6, 9):
            chunk = x[:, start:start + 3]
            with torch.enable_grad():
                results.append(random_tiny(chunk, torch.full((1, 3), 1000.0), ctx, kv_cache=cache,
                                           start_frame=start).detach())
            with torch.no_grad():
                results.append(random_tiny(chunk, torch.zeros(1, 3), ctx, kv_cache=cache, start_frame=start))
        outs[rotated] = results
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(outs[True], outs[False]))
