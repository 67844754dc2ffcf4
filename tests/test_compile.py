"""torch.compile of the Wan blocks (``WanModel.compile_layers``): one compiled graph serves all layers.

Graph counts are dynamo's: what it hands to the backend, read both from a counting backend and from
``torch._dynamo.utils.counters``. The counting backend runs each captured graph as captured (like dynamo's
"eager" backend): what these tests check is the capture - how many graphs, graph breaks, whether every block
call runs compiled code - and that is the same whatever compiles the graphs afterwards, at a fraction of the
cost on 2 CPU cores. ``test_wan_model.py::test_compiled_blocks_equal_eager`` runs the real inductor backend.

The model has 30 layers (the 1.3B model's depth) at a tiny width. Streaming with the shipped cache (3-frame
chunks, 3-frame sink, 9-frame window) makes exactly 3 graphs, one per window length while the ring fills
(3, 6, then 9 frames of keys): the depth, the layer index, the 4 denoising steps and the context pass of a
chunk, eviction and the EMA fold change no graph. The bidirectional (teacher / critic) and block-causal
(training) passes make one graph per input shape.
"""
import contextlib
import sys

import pytest
import torch
import torch._dynamo

from reward_forcing.compile import CompileCounters
from reward_forcing.config import ConfigError, load_config
from reward_forcing.denoising import BlockDenoiser
from reward_forcing.models.wan import WanModel, init_random_
from reward_forcing.schedule import FlowMatchSchedule

LAYERS, BLOCKS, CALLS_PER_BLOCK = 30, 5, 5  # 4 denoising steps + the context pass
H, W = 4, 6  # latent size: 2 x 3 patches per frame


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and every call of the code it returns, recording
    the address of each input (the layer's weights, its cache views, index tensors, activations)."""

    def __init__(self):
        self.graphs = []
        self.calls = []  # per call: data_ptr of each tensor input

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)

        def run(*args):
            self.calls.append([a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args])
            return gm.forward(*args)

        return run


@pytest.fixture(autouse=True)
def dynamo_settings_untouched():
    """No test here may leave a process-wide dynamo setting changed (compile_layers must not change any)."""
    before = torch._dynamo.config.get_config_copy()
    yield
    assert torch._dynamo.config.get_config_copy() == before
    assert not torch._dynamo.config.suppress_errors


@pytest.fixture(scope="module")
def deep_model():
    return init_random_(WanModel.from_flavor("tiny", num_layers=LAYERS, dim=32, ffn_dim=64), seed=0).eval()


def stream(model, seed=0, cache=None, loop_guard=contextlib.nullcontext):
    """The pipeline's block loop (BlockDenoiser) over BLOCKS chunks of 3 frames, context pass included;
    ``loop_guard()`` is entered around the loop alone."""
    schedule = FlowMatchSchedule(5.0)
    denoiser = BlockDenoiser(model, schedule, schedule.warp([1000.0, 750.0, 500.0, 250.0]))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3 * BLOCKS, 16, H, W, generator=gen)
    context = model.prepare_context(torch.randn(1, 5, 32, generator=gen))
    cache = cache or model.new_kv_cache(1, H, W)
    cache.reset()
    draw = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    with torch.no_grad(), loop_guard():
        out = [denoiser.denoise_block(noise[:, s:s + 3], context, cache, s, draw) for s in range(0, 3 * BLOCKS, 3)]
    assert cache.num_sink_updates == BLOCKS - 3  # the window slid and the EMA sink was folded
    return torch.cat(out, 1), cache


def test_one_graph_per_window_length_serves_all_layers_and_calls(deep_model):
    eager, _ = stream(deep_model)
    backend, before = CountingBackend(), CompileCounters.read()
    deep_model.compile_layers(backend=backend)
    try:
        compiled, cache = stream(deep_model)
    finally:
        deep_model.uncompile_layers()
    counts = CompileCounters.read() - before
    assert len(backend.graphs) == counts.graphs == 3  # window of 3, 6, 9 frames
    assert counts.graph_breaks == 0
    assert len(backend.calls) == BLOCKS * CALLS_PER_BLOCK * LAYERS  # every block call ran compiled code
    assert not deep_model.compile_failures
    assert torch.equal(compiled, eager)  # the captured graphs run the same ops as eager

    # CUDA-graph readiness: within a chunk, a layer's compiled code gets the same inputs at the same addresses
    # on all 5 calls (weights, its cache views, token indices, RoPE tables, cross-attention K/V) except the
    # hidden states and the time modulation, which a CUDA graph copies into its static inputs.
    for block in range(BLOCKS):
        for layer in range(LAYERS):
            calls = [backend.calls[(block * CALLS_PER_BLOCK + c) * LAYERS + layer] for c in range(CALLS_PER_BLOCK)]
            moved = {i for call in calls[1:] for i, ptr in enumerate(call) if ptr != calls[0][i]}
            assert len(moved) <= 2, (block, layer, moved)
            views = {t.data_ptr() for t in cache.layer_views[layer] if t is not None}
            assert views <= set(calls[0])


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal"])
def test_teacher_critic_and_block_causal_passes_make_one_graph(deep_model, mode):
    x, context = torch.randn(2, 6, 16, H, W), torch.randn(2, 5, 32)
    timesteps = [torch.tensor([900.0, 100.0]), torch.tensor([250.0, 500.0])]
    if mode == "block_causal":
        timesteps = [torch.rand(2, 6) * 1000 for _ in range(2)]

    def run():
        with torch.no_grad():
            return [deep_model(x, t, context, causal=mode == "block_causal") for t in timesteps]

    eager = run()
    backend, before = CountingBackend(), CompileCounters.read()
    deep_model.compile_layers(backend=backend)
    try:
        compiled = run()
    finally:
        deep_model.uncompile_layers()
    assert len(backend.graphs) == (CompileCounters.read() - before).graphs == 1
    assert (CompileCounters.read() - before).graph_breaks == 0
    assert len(backend.calls) == 2 * LAYERS
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_failed_compile_raises_unless_eager_fallback_is_asked_for():
    model = init_random_(WanModel.from_flavor("tiny"), seed=0).eval()
    x, t, context = torch.randn(1, 3, 16, H, W), torch.tensor([500.0]), torch.randn(1, 5, 32)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this graph")

    with torch.no_grad():
        eager = model(x, t, context)
        model.compile_layers(backend=broken_backend)
        with pytest.raises(Exception, match="no kernel for this graph"):
            model(x, t, context)
        model.compile_layers(backend=broken_backend, fallback="eager")
        with pytest.warns(RuntimeWarning, match="no kernel for this graph"):  # the warning names the cause
            fallen_back = model(x, t, context)
    assert not model.layers_compiled and len(model.compile_failures) == 1
    assert torch.equal(fallen_back, eager)
    with pytest.raises(ValueError, match="compile fallback 'retry'"):
        model.compile_layers(fallback="retry")


class HostSyncError(AssertionError):
    pass


def test_denoising_steps_make_no_host_sync():
    """Inside the block loop nothing reads a tensor value back to Python (.item(), .tolist(), bool(), int(),
    float(), nonzero): on a GPU each would stall the queue and break CUDA-graph capture. The first video fills
    the memoised index and RoPE tables; the second must run without a single read-back."""
    model = init_random_(WanModel.from_flavor("tiny"), seed=0).eval()
    _, cache = stream(model)  # a pipeline keeps its cache (and its memoised indices) across videos

    def forbidden(name):
        def fail(*args, **kwargs):
            raise HostSyncError(f"host sync: Tensor.{name} inside the block loop")
        return fail

    @contextlib.contextmanager
    def no_read_backs():
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"):
                patch.setattr(torch.Tensor, name, forbidden(name))
            patch.setattr(torch, "nonzero", forbidden("nonzero"))
            yield

    out, _ = stream(model, seed=1, cache=cache, loop_guard=no_read_backs)
    assert out.shape == (1, 3 * BLOCKS, 16, H, W) and torch.isfinite(out).all()
    with pytest.raises(HostSyncError), no_read_backs():  # the check itself works
        torch.ones(1).item()


def test_compile_settings_are_validated_by_the_config():
    cfg = load_config(None, ["model.compile=true", "model.compile_mode=max-autotune", "model.compile_fallback=eager"])
    assert (cfg.model.compile, cfg.model.compile_mode, cfg.model.compile_fallback) == (True, "max-autotune", "eager")
    with pytest.raises(ConfigError, match="model.compile_mode.*'fastest'"):
        load_config(None, ["model.compile_mode=fastest"])
    with pytest.raises(ConfigError, match="model.compile_fallback"):
        load_config(None, ["model.compile_fallback=never"])


def test_benchmark_compile_flags_default_to_the_config():
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("benchmark_for_compile", REPO_ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--compile", "model.compile_mode=max-autotune", "model.compile_fallback=eager"])
    assert (args.compile, args.compile_mode, args.compile_fallback) == (True, "max-autotune", "eager")
    args = bench.parse_args(["--compile_mode", "reduce-overhead", "--compile_fallback", "error"])
    assert (args.compile, args.compile_mode, args.compile_fallback) == (False, "reduce-overhead", "error")
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile", "--compile_mode", "fastest"])
