"""KV cache bookkeeping: eviction order, EMA-Sink arithmetic and counts, RoPE positions, policies, errors."""
import pytest
import torch

from reward_forcing.models.kv_cache import CausalSpec, KVCache, block_causal_plan


IDENTITY = lambda keys: keys  # noqa: E731 - a RoPE stand-in for bookkeeping tests


def make_cache(spec=CausalSpec(), *, layers=1, frame_tokens=1, max_frames=None, batch=1):
    return KVCache(num_layers=layers, num_heads=1, head_dim=2, frame_tokens=frame_tokens, batch_size=batch,
                   spec=spec, max_frames=max_frames)


@torch.no_grad()
def write_chunk(cache, start, n, value_of=lambda frame: float(frame)):
    """One new-chunk call: every layer writes keys/values equal to value_of(frame). Returns the step."""
    step = cache.begin(start, n)
    ft = cache.frame_tokens
    vals = torch.tensor([value_of(a) for a in range(start, start + n)]).repeat_interleave(ft)
    kv = vals.view(1, n * ft, 1, 1).expand(cache.batch_size, -1, 1, 2).clone()
    for layer in range(cache.k.shape[0]):
        cache.layer(layer, step).attend(kv, -kv, IDENTITY, IDENTITY)
    return step


def stream(cache, num_frames, block=3, calls_per_block=5):
    """Mimic the pipeline: 4 denoising calls + 1 context call per block. Returns evicted frames per block."""
    evicted = []
    for start in range(0, num_frames, block):
        step = write_chunk(cache, start, block)
        evicted.append(step.evicted_frames)
        for _ in range(calls_per_block - 1):
            repeat = cache.begin(start, block)
            assert not repeat.new_chunk and repeat.evicted_frames == []
    return evicted


def test_shipped_config_evicts_oldest_non_sink_block():
    cache = make_cache()
    evicted = stream(cache, 21)
    assert evicted == [[], [], [], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert cache.window_frames() == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    assert cache.num_sink_updates == 4


def test_update_count_for_120_frames():
    cache = make_cache()
    stream(cache, 120)
    assert cache.num_sink_updates == 37
    assert cache.window_frames() == [0, 1, 2] + list(range(114, 120))


def test_window_and_rope_positions_per_block():
    cache = make_cache()
    expected_keys = {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5]}
    for b in range(7):
        step = write_chunk(cache, 3 * b, 3)
        frames = sorted(step.slot_frame)
        assert frames == expected_keys.get(b, [0, 1, 2, 3 * b - 3, 3 * b - 2, 3 * b - 1, 3 * b, 3 * b + 1, 3 * b + 2])
        # Keys are ranked sink first; queries take the last positions of the window (never above 8).
        assert [step.positions[a] for a in frames] == list(range(len(frames)))
        assert step.query_positions == {0: [0, 1, 2], 1: [3, 4, 5]}.get(b, [6, 7, 8])


@pytest.mark.parametrize("alpha", [0.999, 0.9])
def test_ema_sink_arithmetic(alpha):
    cache = make_cache(CausalSpec(ema_alpha=alpha))
    value = lambda a: float(a) ** 2 + 1  # noqa: E731 - distinct value per frame
    for b in range(5):
        write_chunk(cache, 3 * b, 3, value)
    sink_k, sink_v = cache.sink_kv(0)
    # Block 3 evicted frames 3..5, block 4 evicted 6..8, token j into sink token j.
    for j in range(3):
        expected = alpha * (alpha * value(j) + (1 - alpha) * value(3 + j)) + (1 - alpha) * value(6 + j)
        assert sink_k[0, j, 0, 0].item() == pytest.approx(expected, rel=1e-6)
        assert sink_v[0, j, 0, 0].item() == pytest.approx(-expected, rel=1e-6)


def test_static_sink_is_kept_verbatim_and_none_has_no_sink():
    static = make_cache(CausalSpec(sink_policy="static"))
    stream(static, 21)
    assert static.sink_kv(0)[0][0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert static.num_sink_updates == 0
    none = make_cache(CausalSpec(sink_policy="none"))
    stream(none, 21)
    assert none.window_frames() == list(range(12, 21))  # a plain 9-frame sliding window
    assert none.sink == 0


def test_sink_size_zero_has_valid_positions():
    cache = make_cache(CausalSpec(sink_size=0))
    for b in range(6):
        step = write_chunk(cache, 3 * b, 3)
        n = len(step.slot_frame)
        assert sorted(step.positions.values()) == list(range(n))
        assert step.query_positions == list(range(n - 3, n))
    assert cache.window_frames() == list(range(9, 18))


def test_chunk_size_different_from_sink_folds_round_robin():
    alpha = 0.5
    # 1-frame chunks, 3-frame sink, 6-frame window: each evicted frame a folds into sink frame (a - 3) % 3.
    cache = make_cache(CausalSpec(frames_per_block=1, local_attn_size=6, sink_size=3, ema_alpha=alpha))
    sink = [0.0, 1.0, 2.0]
    evicted_all = []
    for a in range(12):
        step = write_chunk(cache, a, 1)
        for frame in step.evicted_frames:
            evicted_all.append(frame)
            j = (frame - 3) % 3
            sink[j] = alpha * sink[j] + (1 - alpha) * frame
    assert evicted_all == list(range(3, 9))
    assert cache.sink_kv(0)[0][0, :, 0, 0].tolist() == pytest.approx(sink)
    # 6-frame chunks, 3-frame sink, 9-frame window (a 6-frame ring): the second chunk both fills the ring
    # (frames 6..8) and evicts frames 3..5; the third evicts 6..11, so each sink frame gets two EMA steps
    # there, oldest frame first.
    cache = make_cache(CausalSpec(frames_per_block=6, local_attn_size=9, sink_size=3, ema_alpha=alpha))
    evicted = [write_chunk(cache, start, 6).evicted_frames for start in (0, 6, 12)]
    assert evicted == [[], [3, 4, 5], [6, 7, 8, 9, 10, 11]]
    expected = []
    for j in range(3):
        value = j
        for frame in (3 + j, 6 + j, 9 + j):
            value = alpha * value + (1 - alpha) * frame
        expected.append(value)
    assert cache.sink_kv(0)[0][0, :, 0, 0].tolist() == pytest.approx(expected)
    assert cache.window_frames() == [0, 1, 2] + list(range(12, 18))


def test_ring_buffer_never_reallocates_or_rolls():
    cache = make_cache(CausalSpec(sink_policy="static"), frame_tokens=2)
    ptr = cache.k.data_ptr()
    stream(cache, 15)
    assert cache.k.data_ptr() == ptr
    # Frames 12..14 overwrote the slots of frames 6..8 in place; 9..11 stayed where they were written.
    held = cache.k[0, 0, ::2, 0, 0].tolist()
    assert held == [0.0, 1.0, 2.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0]


def test_grad_path_snapshots_past_and_commits_after():
    cache = make_cache()
    stream(cache, 6)
    new = torch.full((1, 3, 1, 2), 7.0, requires_grad=True)
    with torch.enable_grad():
        step = cache.begin(6, 3)
        layer = cache.layer(0, step)
        k, v = layer.attend(new, new, IDENTITY, IDENTITY)
    assert step.snapshot and k.shape[1] == 9 and k.requires_grad
    assert step.key_positions == list(range(9))  # past slots (frames 0..5), then the chunk
    assert cache.k[0, 0, 6, 0, 0].item() == 0.0  # not written yet
    layer.commit()
    assert cache.k[0, 0, 6:9, 0, 0].tolist() == [7.0, 7.0, 7.0]


def test_errors_name_the_problem():
    cache = make_cache()
    write_chunk(cache, 0, 3)
    with pytest.raises(ValueError, match="expected a chunk starting at frame 3"):
        cache.begin(6, 3)
    with pytest.raises(ValueError, match="batch 1"):
        step = cache.begin(3, 3)
        with torch.no_grad():
            cache.layer(0, step).attend(torch.zeros(2, 3, 1, 2), torch.zeros(2, 3, 1, 2), IDENTITY, IDENTITY)
    with pytest.raises(ValueError, match="local_attn_size=5 frames cannot hold"):
        CausalSpec(local_attn_size=5, sink_size=3, frames_per_block=3)
    with pytest.raises(ValueError, match="sink_policy"):
        CausalSpec(sink_policy="lru")
    with pytest.raises(ValueError, match="max_frames"):
        make_cache(CausalSpec(local_attn_size=-1))
    glob = make_cache(CausalSpec(local_attn_size=-1), max_frames=6)
    write_chunk(glob, 0, 3)
    write_chunk(glob, 3, 3)
    assert glob.window_frames() == list(range(6))
    with pytest.raises(RuntimeError, match="max_frames"):
        write_chunk(glob, 6, 3)


def test_reset_starts_a_new_video():
    cache = make_cache()
    stream(cache, 15)
    cache.reset()
    step = write_chunk(cache, 0, 3)
    assert step.slot_frame == [0, 1, 2] and cache.num_sink_updates == 0


def test_absolute_rope_positions_are_frame_indices():
    cache = make_cache(CausalSpec(sink_policy="static", local_attn_size=12, rope_positions="absolute"))
    for b in range(6):
        step = write_chunk(cache, 3 * b, 3)
    assert sorted(step.slot_frame) == [0, 1, 2, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert [step.positions[a] for a in sorted(step.slot_frame)] == sorted(step.slot_frame)  # sink stays at 0..2
    assert step.query_positions == [15, 16, 17]
    plan = block_causal_plan(CausalSpec(sink_policy="static", local_attn_size=12, rope_positions="absolute"), 18)
    assert all(c.positions == [0, 1, 2] for c in plan.sink_copies)  # never shifted
    with pytest.raises(ValueError, match="rope_positions 'relative' is not 'window' or 'absolute'"):
        CausalSpec(rope_positions="relative")


def test_block_causal_plan_is_the_streaming_window():
    """One pass over 12 frames attends like streaming them: each chunk sees the frames a streaming cache holds
    at that chunk, and the sink at the positions that cache gives it (shifted to absolute query positions)."""
    plan = block_causal_plan(CausalSpec(), 12)
    assert [c.queries for c in plan.sink_copies] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert all(c.frames == [0, 1, 2] for c in plan.sink_copies)
    # Window-relative ranks: the 4th chunk's first query has rank 6 at absolute position 9, so its sink moves by 3.
    assert [c.positions for c in plan.sink_copies] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4, 5]]
    mask = plan.frame_mask
    assert mask.shape == (12, 12 + 4 * 3)
    attended = [(mask[q, :12].nonzero().flatten().tolist(), mask[q, 12:].nonzero().flatten().tolist())
                for q in (0, 4, 8, 10)]
    assert attended == [([], [0, 1, 2]),  # chunk 0 is all sink: its copy, nothing else
                        ([3, 4, 5], [3, 4, 5]),
                        ([3, 4, 5, 6, 7, 8], [6, 7, 8]),
                        ([6, 7, 8, 9, 10, 11], [9, 10, 11])]  # frames 3..5 left the 6-frame ring
