"""StreamingPipeline: golden replay with injected noise, streaming == generate, cache ownership, batches."""
import contextlib

import pytest
import torch

from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.models.wan import WanModel, init_random_
from reward_forcing.interactive import Session
from reward_forcing.pipeline import StreamingPipeline, cpu_gaussian
from reward_forcing.streaming import StreamSettings
from conftest import PARITY_ATOL, REPO_ROOT


def test_replays_reference_run_with_injected_noise(golden_tiny_model, golden_trace):
    """Replay mode 2 of tests/golden/README.md: our pipeline on the recorded noise and re-noising draws."""
    tr = golden_trace
    pipe = StreamingPipeline(golden_tiny_model, None, None)
    assert pipe.timesteps == [1000.0, 937.5, 833.3333129882812, 625.0]
    _, latents = pipe.generate(context=tr["context"], num_frames=21, height=48, width=80, noise=tr["noise"],
                               renoise=[tr[f"eps{i:03d}"] for i in range(21)], decode=False)
    assert latents.shape == tr["output"].shape
    assert (latents - tr["output"]).abs().max() <= PARITY_ATOL


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml"))


def test_stream_yields_blocks_and_equals_generate(tiny_pipe):
    chunks = list(tiny_pipe.stream("a fox in the snow", num_frames=9, height=48, width=80, seed=3))
    assert [c.frames.shape[1] for c in chunks] == [9, 12, 12]  # first block 1 + 4*2 frames, then 4*3
    assert chunks[0].frames.shape[2:] == (3, 48, 80) and chunks[0].latents.shape == (1, 3, 16, 6, 10)
    assert all(c.frames.min() >= -1 and c.frames.max() <= 1 for c in chunks)
    frames, latents = tiny_pipe.generate("a fox in the snow", num_frames=9, height=48, width=80, seed=3)
    assert torch.equal(frames, torch.cat([c.frames for c in chunks], 1))
    assert torch.equal(latents, torch.cat([c.latents for c in chunks], 1))
    assert frames.shape[1] == 1 + 4 * (9 - 1)


def test_stream_is_a_loop_over_a_session(tiny_pipe, monkeypatch):
    """stream() equals a Session given the seed's noise in stream()'s draw order (all initial noise first, then
    the re-noising draws from the same generator), block for block and bit for bit, batch of 2; the benchmark's
    phase marks fire in the same order; and stream() drives one session's next_block."""
    size = dict(height=48, width=80)
    context = tiny_pipe.encode_prompts(["a fox in the snow", "a red car"])
    phases = []
    tiny_pipe.phase_hook = phases.append
    try:
        chunks = list(tiny_pipe.stream(context=context, num_frames=6, seed=3, **size))
    finally:
        tiny_pipe.phase_hook = None
    assert phases == ["prepare_context"] + ["steps", "context", "decode", "block_end"] * 2

    draw = cpu_gaussian(3)
    noise = draw((2, 6, 16, 6, 10))
    session = Session(tiny_pipe, context=context, noise=noise, renoise=draw, **size)
    blocks = session.blocks(2)
    assert [c.index for c in chunks] == [b.index for b in blocks] == [0, 1]
    assert all(torch.equal(c.latents, b.latents) and torch.equal(c.frames, b.frames) for c, b in zip(chunks, blocks))
    assert chunks[0].latents.shape == (2, 3, 16, 6, 10) and not torch.equal(chunks[0].latents[0], chunks[0].latents[1])
    with pytest.raises(ValueError, match="noise covers 2 blocks; block 2 has none"):
        session.next_block()

    driven = []
    next_block = Session.next_block
    monkeypatch.setattr(Session, "next_block", lambda self: driven.append(self) or next_block(self))
    latents = torch.cat([c.latents for c in tiny_pipe.stream(context=context, num_frames=6, seed=3, **size)], 1)
    assert len(driven) == 2 and driven[0] is driven[1]
    assert torch.equal(latents, torch.cat([b.latents for b in blocks], 1))


def test_seed_determinism_and_cache_reset_between_prompts(tiny_pipe):
    kw = dict(num_frames=6, height=48, width=80, decode=False)
    _, a1 = tiny_pipe.generate("a red car", seed=5, **kw)
    _, b = tiny_pipe.generate("a blue boat", seed=5, **kw)
    _, a2 = tiny_pipe.generate("a red car", seed=5, **kw)
    _, a3 = tiny_pipe.generate("a red car", seed=6, **kw)
    assert torch.equal(a1, a2)  # the reused caches were reset / overwritten: no leakage from the previous prompt
    assert not torch.equal(a1, b) and not torch.equal(a1, a3)


def test_batch_equals_individual_runs():
    model = init_random_(WanModel.from_flavor("tiny"), seed=2).eval()
    pipe = StreamingPipeline(model, None, None)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 5, 32, generator=g)
    noise = torch.randn(2, 9, 16, 4, 6, generator=g)
    eps = [torch.randn(2, 3, 16, 4, 6, generator=g) for _ in range(9)]
    _, both = pipe.generate(context=ctx, num_frames=9, height=32, width=48, noise=noise, renoise=eps, decode=False)
    for i in range(2):
        _, one = pipe.generate(context=ctx[i:i + 1], num_frames=9, height=32, width=48, noise=noise[i:i + 1],
                               renoise=[e[i:i + 1] for e in eps], decode=False)
        assert (one - both[i:i + 1]).abs().max() <= 1e-5


@contextlib.contextmanager
def timesteps_of_calls(model):
    """Record the timestep of every generator call made inside the block."""
    calls, original = [], model.forward

    def spy(x, t, *args, **kwargs):
        calls.append(float(t.flatten()[0]))
        return original(x, t, *args, **kwargs)

    model.forward = spy
    try:
        yield calls
    finally:
        del model.forward


def test_each_block_is_four_warped_steps_then_a_context_pass():
    """Per block: the generator is called at 1000, 937.5, 833.33, 625, then once at t=0 on the clean block."""
    model = init_random_(WanModel.from_flavor("tiny"), seed=2).eval()
    pipe = StreamingPipeline(model, None, None)
    ctx, noise = torch.randn(1, 5, 32), torch.randn(1, 6, 16, 4, 6)
    with timesteps_of_calls(model) as calls:
        _, latents = pipe.generate(context=ctx, num_frames=6, height=32, width=48, noise=noise, seed=1, decode=False)
    assert calls == [1000.0, 937.5, 833.3333129882812, 625.0, 0.0] * 2
    assert latents.shape == (1, 6, 16, 4, 6)


def test_without_the_context_pass_the_cache_keeps_the_last_step():
    """schedule.context_pass=false: 4 calls per block; block 0 is unchanged, later blocks see other keys."""
    model = init_random_(WanModel.from_flavor("tiny"), seed=2).eval()
    ctx, noise = torch.randn(1, 5, 32), torch.randn(1, 6, 16, 4, 6)
    latents = {}
    for context_pass in (True, False):
        pipe = StreamingPipeline(model, None, None, StreamSettings(context_pass=context_pass))
        with timesteps_of_calls(model) as calls:
            _, latents[context_pass] = pipe.generate(context=ctx, num_frames=6, height=32, width=48, noise=noise,
                                                     seed=1, decode=False)
    assert calls == [1000.0, 937.5, 833.3333129882812, 625.0] * 2
    assert torch.equal(latents[True][:, :3], latents[False][:, :3])
    assert not torch.allclose(latents[True][:, 3:], latents[False][:, 3:])
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["schedule.context_pass=false"])
    assert build_pipeline(cfg).denoiser.write_clean_context is False


def test_bad_arguments(tiny_pipe):
    with pytest.raises(ValueError, match="multiple of the 3-frame block"):
        next(tiny_pipe.stream("x", num_frames=20, height=48, width=80))
    with pytest.raises(ValueError, match="exactly one of prompts or context"):
        next(tiny_pipe.stream("x", context=torch.zeros(1, 4, 32), num_frames=3, height=48, width=80))
    with pytest.raises(ValueError, match="multiples of 16"):
        next(tiny_pipe.stream("x", num_frames=3, height=50, width=80))
    with pytest.raises(ValueError, match="noise has shape"):
        next(tiny_pipe.stream("x", num_frames=3, height=48, width=80, noise=torch.zeros(1, 6, 16, 6, 10)))


def test_offloaded_text_encoder_visits_the_device_only_to_encode():
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", ["text.offload_text_encoder=true"])
    pipe = build_pipeline(cfg)
    moves = []
    original_to = pipe.text_encoder.to

    def spy(*args, **kwargs):
        moves.append(str(args[0]))
        return original_to(*args, **kwargs)

    pipe.text_encoder.to = spy
    encode = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda prompts: (moves.append("encode"), encode(prompts))[1]
    pipe.generate("a red car", num_frames=3, height=48, width=80, decode=False)
    assert moves == [str(pipe.device), "encode", "cpu"]


def test_a_session_allocates_its_caches_once(tiny_pipe):
    """KV cache and cross-attention K/V are the session's own, allocated once and written in place (a prompt switch
    overwrites the text K/V; nothing is handed to or from the pipeline)."""
    session = Session(tiny_pipe, "a red car", seed=0, height=48, width=80, decode=False)
    kv, text = session.cache.k.data_ptr(), session._text.layer_kv[0][0].data_ptr()
    session.blocks(2)
    session.set_prompt("a blue boat")
    session.blocks(2)
    assert session.cache.k.data_ptr() == kv and session._text.layer_kv[0][0].data_ptr() == text
    assert not hasattr(tiny_pipe, "cache") and not hasattr(tiny_pipe, "_text")


def test_a_new_attention_pattern_needs_no_cache_bookkeeping(tiny_pipe):
    """Changing ``generator.causal`` between streams (e.g. another sink policy) takes effect in the next stream."""
    kw = dict(num_frames=15, height=48, width=80, decode=False)  # 5 blocks: frames leave the 9-frame window
    original = tiny_pipe.generator.causal
    try:
        _, ema = tiny_pipe.generate("a red car", **kw)
        tiny_pipe.generator.causal = original.with_policy("none")
        _, none = tiny_pipe.generate("a red car", **kw)
        fresh = type(tiny_pipe)(tiny_pipe.generator, tiny_pipe.text_encoder, tiny_pipe.vae,
                                StreamSettings(height=48, width=80))
        _, expected = fresh.generate("a red car", **kw)  # a pipeline that never saw the ema pattern
        assert torch.equal(none, expected) and not torch.equal(none, ema)
    finally:
        tiny_pipe.generator.causal = original
