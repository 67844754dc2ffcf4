"""Live sessions: replay determinism, the prompt-switch policies' cache contents, blends, image/video start,
flat memory over 1000 blocks, timelines and start media."""
import gc
import json

import numpy as np
import pytest
import torch

from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.pipeline import StreamingPipeline
from reward_forcing.streaming import StreamSettings
from reward_forcing.interactive import (Reset, Session, SetPrompt, SetSeed, SetSinkAlpha, fit_frames, load_timeline,
                                        read_image)
from reward_forcing.video_io import read_video
from reward_forcing.video_io import Mp4Writer
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml"))


def _latents(blocks):
    return [b.latents for b in blocks]


def _snapshot(cache):
    return cache.k.clone(), cache.v.clone(), list(cache.slot_frame), cache.end_frame


def _slot_tokens(cache, slot):
    return slice(slot * cache.frame_tokens, (slot + 1) * cache.frame_tokens)


def _slots_equal(cache, before, slot):
    k, v = before[0], before[1]
    t = _slot_tokens(cache, slot)
    return torch.equal(cache.k[:, :, t], k[:, :, t]) and torch.equal(cache.v[:, :, t], v[:, :, t])


# ------------------------------------------------------------------------------------------ the block loop
def test_first_block_is_the_pipelines_block(pipe):
    """Same loop as stream(): one block from the same seed is bit-identical, latents and pixels."""
    chunk = next(pipe.stream("a fox", num_frames=3, seed=7))
    block = Session(pipe, "a fox", seed=7).next_block()
    assert torch.equal(block.latents, chunk.latents) and torch.equal(block.frames, chunk.frames)
    assert (block.index, block.epoch, block.epoch_block, block.prompt) == (0, 0, 0, "a fox")


def test_a_batch_session_streams_each_row_as_if_alone(pipe):
    """context= with B = 2: each row equals a session of that row alone (same noise, same re-noising draws),
    through a prompt switch, which gives the new prompt to both rows."""
    small = dict(height=16, width=16, decode=False)
    context = pipe.encode_prompts(["a red car", "a blue boat"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 6, 16, 2, 2, generator=g)
    eps = [torch.randn(2, 3, 16, 2, 2, generator=g) for _ in range(6)]  # 3 re-noising draws per block

    def run(rows):
        draws = iter([e[rows] for e in eps])
        session = Session(pipe, context=context[rows], noise=noise[rows], renoise=lambda shape: next(draws), **small)
        blocks = session.blocks(1)
        session.set_prompt("a green tree", policy="recache")
        blocks += session.blocks(1)
        assert session.prompt == "a green tree" and session._context.shape[0] == context[rows].shape[0]
        return torch.cat(_latents(blocks), 1)

    both = run(slice(0, 2))
    assert both.shape == (2, 6, 16, 2, 2)
    for i in range(2):
        assert (run(slice(i, i + 1)) - both[i:i + 1]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="a start image or video begins one stream, not a batch of 2"):
        Session(pipe, context=context, image=torch.zeros(3, 16, 16), **small)
    with pytest.raises(ValueError, match="exactly one of prompt or context"):
        Session(pipe, "a fox", context=context, **small)
    short = Session(pipe, context=context[:1, :4], **small)  # a context of 4 rows, not the encoder's 512
    short.set_prompt("a fox", blend_blocks=2)
    with pytest.raises(ValueError, match=r"cannot blend the context in effect \(1, 4, 32\)"):
        short.next_block()


def test_replaying_the_events_is_bit_identical(pipe):
    small = dict(height=16, width=16)
    live = Session(pipe, "a red car", seed=1, **small)
    blocks = live.blocks(2)
    live.set_prompt("a blue boat", policy="cross")
    blocks += live.blocks(2)
    live.set_prompt("a green tree", policy="recache", blend_blocks=2)
    blocks += live.blocks(1)
    live.set_seed(11)
    live.set_sink_alpha(0.9)
    blocks += live.blocks(1)
    live.set_prompt("a city at night", policy="recache_sink")
    blocks += live.blocks(2)
    live.reset(prompt="waves", seed=4)
    blocks += live.blocks(2)
    assert [type(e) for e in live.events] == [SetPrompt, SetPrompt, SetSeed, SetSinkAlpha, SetPrompt, Reset]
    assert [e.block for e in live.events] == [2, 4, 5, 5, 6, 8]
    assert [b.epoch for b in blocks] == [0] * 8 + [1] * 2 and blocks[8].epoch_block == 0
    assert blocks[8].frames.shape[1] == 9  # a new video: the decoder starts over

    replay = Session(pipe, "a red car", seed=1, events=live.events, **small).blocks(len(blocks))
    for a, b in zip(blocks, replay):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert [b.prompt for b in replay] == [b.prompt for b in blocks]

    plain = Session(pipe, "a red car", seed=1, decode=False, **small).blocks(4)
    assert all(torch.equal(a, b) for a, b in zip(_latents(plain[:2]), _latents(blocks[:2])))  # before the switch
    assert not torch.equal(plain[2].latents, blocks[2].latents)  # the switch takes effect at block 2


# ------------------------------------------------------------------------------------------ switch policies
@pytest.fixture
def warm(pipe):
    """A session 4 blocks in (frames 0..11: frames 3..5 folded into the sink, the ring holding frames 6..11)."""
    session = Session(pipe, "a red car", seed=2, decode=False)
    session.blocks(4)
    assert sorted(session.cache.slot_frame) == [0, 1, 2] + list(range(6, 12))
    assert session.cache.num_sink_updates == 1
    return session


def test_cross_changes_only_cross_attention(warm):
    before = _snapshot(warm.cache)
    text_before = warm._text_for_block().layer_kv[0][0].clone()
    warm.set_prompt("a blue boat", policy="cross")
    warm._apply_due_events()
    assert torch.equal(warm.cache.k, before[0]) and torch.equal(warm.cache.v, before[1])
    assert warm.cache.slot_frame == before[2] and warm.cache.end_frame == before[3]
    assert not torch.equal(warm._text_for_block().layer_kv[0][0], text_before)


def test_recache_rewrites_the_window_and_keeps_the_sink(warm):
    cache = warm.cache
    before = _snapshot(cache)
    warm.set_prompt("a blue boat", policy="recache")
    warm._apply_due_events()
    assert cache.slot_frame == before[2] and cache.end_frame == before[3] and cache.num_sink_updates == 1
    assert all(_slots_equal(cache, before, s) for s in range(cache.sink))  # sink untouched
    assert not any(_slots_equal(cache, before, s) for s in range(cache.sink, cache.capacity))  # every window slot
    # the next block continues the stream where it was: frames 12..14
    assert warm.next_block().latents.shape[1] == 3 and cache.end_frame == 15


def test_recache_under_the_same_prompt_equals_a_context_pass_over_the_window(pipe, warm):
    """The re-encoding is one t = 0 forward over the window's kept latents (here checked against a copy of the
    cache driven by hand)."""
    cache = warm.cache
    manual = pipe.generator.new_kv_cache(1, *warm.latent_hw)
    for name in ("k", "v", "k_rotated"):
        getattr(manual, name).copy_(getattr(cache, name))
    manual.slot_frame, manual.end_frame, manual.chunk_start = list(cache.slot_frame), cache.end_frame, 9
    window = list(range(6, 12))
    clean = torch.cat([warm._latents[a] for a in window], dim=1)
    manual.reopen(6)
    pipe.denoiser.context_pass(clean, warm._text_for_block(), manual, 6)
    warm.set_prompt("a red car", policy="recache")
    warm._apply_due_events()
    assert torch.equal(manual.k, cache.k) and torch.equal(manual.v, cache.v)


def test_recache_keeps_rotated_keys_consistent(pipe):
    """After a re-encoded window the next block is the same with and without the rotated-key buffer."""
    outs = []
    for rotated in (True, False):
        session = Session(pipe, "a red car", seed=2, decode=False)
        session.cache = pipe.generator.new_kv_cache(1, *session.latent_hw, rotated_keys=rotated)
        session.blocks(4)
        session.set_prompt("a blue boat", policy="recache")
        outs.append(session.blocks(2))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(*outs))


def test_recache_sink_reseeds_the_sink_from_the_window(warm):
    cache = warm.cache
    before = _snapshot(cache)
    window_latents = [warm._latents[a] for a in range(6, 12)]
    warm.set_prompt("a blue boat", policy="recache_sink")
    warm._apply_due_events()
    assert cache.slot_frame == list(range(6)) and cache.end_frame == 6 and cache.num_sink_updates == 0
    assert not any(_slots_equal(cache, before, s) for s in range(6))  # sink re-seeded, window re-encoded
    assert all(torch.equal(warm._latents[i], window_latents[i]) for i in range(6))  # renumbered 0..5
    warm.next_block()
    assert sorted(cache.slot_frame) == list(range(9))


def test_recache_on_the_first_block_leaves_the_sink_alone(pipe):
    """After one block every frame is a sink frame: recache has no window to redo; recache_sink rewrites it."""
    session = Session(pipe, "a red car", seed=2, decode=False)
    session.next_block()
    before = _snapshot(session.cache)
    session.set_prompt("a blue boat", policy="recache")
    session._apply_due_events()
    assert torch.equal(session.cache.k, before[0])
    session.set_prompt("a green tree", policy="recache_sink")
    session._apply_due_events()
    assert session.cache.slot_frame == [0, 1, 2] and not _slots_equal(session.cache, before, 0)


def test_reset_policy_starts_a_new_video(warm):
    epoch = warm.epoch
    warm.set_prompt("a blue boat", policy="reset")
    warm.set_seed(5)
    warm._apply_due_events()
    assert warm.cache.slot_frame == [] and warm.cache.end_frame == 0 and warm.epoch == epoch + 1
    fresh = Session(warm.models, "a blue boat", seed=5, decode=False)  # nothing of the old video leaks
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(warm.blocks(2), fresh.blocks(2)))


def test_blend_interpolates_the_text_over_n_blocks(warm):
    old, new = warm._encode("a red car"), warm._encode("a blue boat")
    warm.set_prompt("a blue boat", policy="cross", blend_blocks=4)
    seen = []
    for _ in range(5):
        warm.next_block()
        seen.append(warm._context)
    for i, weight in enumerate([0.25, 0.5, 0.75]):
        assert torch.equal(seen[i], torch.lerp(old, new, weight))
    assert seen[3] is new and seen[4] is new


def test_sink_alpha_is_live(warm):
    cache = warm.cache
    sink_before = cache.sink_kv(0)[0].clone()
    evicted = cache.k[0][:, _slot_tokens(cache, cache.slot_frame.index(6))].clone()  # next evicted, into sink slot 0
    warm.set_sink_alpha(0.5)
    warm.next_block()
    folded = cache.sink_kv(0)[0][:, :cache.frame_tokens]
    assert torch.allclose(folded, 0.5 * sink_before[:, :cache.frame_tokens] + 0.5 * evicted, atol=1e-6)
    with pytest.raises(ValueError, match="ema_alpha must be in .0, 1., got 1.5"):
        warm.set_sink_alpha(1.5)


def test_memory_is_flat_over_1000_blocks(pipe):
    one_step = StreamingPipeline(pipe.generator, pipe.text_encoder, None, StreamSettings(denoising_steps=(1000.0,)))  # 2 forwards
    session = Session(one_step, "a fox", seed=0, height=16, width=16, decode=False)

    def live_tensor_bytes():
        gc.collect()
        return sorted(t.numel() * t.element_size() for t in gc.get_objects() if type(t) is torch.Tensor)

    for _ in range(50):
        session.next_block()
    early = live_tensor_bytes()
    for _ in range(1000):
        session.next_block()
    assert live_tensor_bytes() == early
    assert session.block == 1050 and len(session._latents) == session.cache.capacity


# ------------------------------------------------------------------------------------------ start media
def test_image_start_writes_the_image_as_the_first_block(pipe):
    image = torch.rand(3, 48, 80) * 2 - 1
    session = Session(pipe, "a fox", seed=3, image=image)
    assert session.cache.slot_frame == [0, 1, 2] and session.epoch == 0
    expected = pipe.vae.encode(image[None, None].expand(1, 9, -1, -1, -1))
    assert torch.equal(torch.cat([session._latents[a] for a in range(3)], 1), expected)
    manual = pipe.generator.new_kv_cache(1, 6, 10)
    pipe.denoiser.context_pass(expected, session._text_for_block(), manual, 0)
    assert torch.equal(manual.sink_kv(1)[0], session.cache.sink_kv(1)[0])  # the image seeds the sink
    block = session.next_block()
    assert block.frames.shape[1] == 12  # the repeated image frames are not output; the decoder continues
    plain = Session(pipe, "a fox", seed=3).next_block()
    assert not torch.equal(plain.latents, block.latents)
    with pytest.raises(ValueError, match=r"start image must be pixels \[3, 48, 80\]"):
        Session(pipe, "a fox", image=torch.zeros(3, 32, 32))


def test_extend_seeds_the_sink_with_the_first_frames_and_the_window_with_the_last(pipe):
    video = torch.rand(42, 3, 48, 80) * 2 - 1  # 41 usable frames (1 + 4 * 10) -> 11 latents
    latents = pipe.vae.encode(video[1:][None])
    session = Session(pipe, "a fox", seed=3, video=video)
    assert sorted(session.cache.slot_frame) == list(range(9))
    kept = torch.cat([session._latents[a] for a in range(9)], 1)
    assert torch.equal(kept, torch.cat([latents[:, :3], latents[:, -6:]], 1))
    assert session.next_block().frames.shape[1] == 12


def test_fit_frames_resizes_and_crops_and_says_so():
    frames = np.full((2, 96, 96, 3), 200, np.uint8)
    pixels, note = fit_frames(frames, 48, 80)
    assert pixels.shape == (2, 3, 48, 80) and torch.allclose(pixels, torch.full_like(pixels, 200 / 127.5 - 1))
    assert note == "resized 96x96 to 80x80 and center-cropped to 80x48"
    same, note = fit_frames(np.zeros((1, 48, 80, 3), np.uint8), 48, 80)
    assert note is None and same.min() == -1
    _, note = fit_frames(np.zeros((1, 48, 100, 3), np.uint8), 48, 80)
    assert note == "center-cropped 100x48 to 80x48"
    _, note = fit_frames(np.zeros((1, 96, 160, 3), np.uint8), 48, 80)
    assert note == "resized 160x96 to 80x48"
    # the crop is centred: a bright column in the middle stays in the middle
    wide = np.zeros((1, 48, 100, 3), np.uint8)
    wide[:, :, 50] = 255
    cropped, _ = fit_frames(wide, 48, 80)
    assert cropped[0, 0, 0, 40] == 1 and cropped[0, 0, 0, 39] == -1


def test_unreadable_media_give_one_clear_line(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image '.*x.png' is not a readable image"):
        read_image(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"video '.*x.png' could not be decoded"):
        read_video(bad)


def test_read_media_round_trip(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (10, 12, 3)
    with Mp4Writer(tmp_path / "v.mp4", fps=16) as writer:
        writer.write(np.zeros((5, 48, 80, 3), np.uint8))
    frames, fps = read_video(tmp_path / "v.mp4")
    assert frames.shape == (5, 48, 80, 3) and fps == 16


# ------------------------------------------------------------------------------------------ timelines
def test_timeline_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"block": 4, "prompt": "a cat", "policy": "recache", "blend": 2},
                                {"block": 1, "seed": 3}, {"block": 6, "reset": True, "prompt": "b"},
                                {"block": 7, "sink_alpha": 0.99}]))
    assert load_timeline(path) == [SetSeed(1, 3), SetPrompt(4, "a cat", "recache", 2), Reset(6, "b"),
                                   SetSinkAlpha(7, 0.99)]


@pytest.mark.parametrize("entry, message", [
    ({"block": -1, "prompt": "a"}, "'block' must be a whole number >= 0"),
    ({"block": 1, "prompt": "a", "policy": "swap"}, "policy 'swap' is not one of"),
    ({"block": 1, "colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"block": 1}, "an event needs one of"),
    ({"block": 1, "prompt": "a", "seed": 2}, "one action per event"),
])
def test_timeline_errors_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"block": 0, "prompt": "ok"}, entry]))
    with pytest.raises(ValueError, match=r"entry 1 .*" + message):
        load_timeline(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_timeline(path)


# ------------------------------------------------------------------------------------------ inference.py
@pytest.fixture(scope="module")
def cli():
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("inference_cli_interactive", REPO_ROOT / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_timeline_and_image_start(cli, tmp_path, caplog):
    from PIL import Image
    from reward_forcing.video_io import read_video
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    timeline = tmp_path / "t.json"
    timeline.write_text(json.dumps([{"block": 1, "prompt": "a cat", "policy": "recache"}]))
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "start.png")
    out = tmp_path / "out"
    args = ["--config_path", REPO_ROOT / "configs" / "tiny.yaml", "--data_path", prompts, "--output_folder", out,
            "--num_output_frames", 6, "--timeline", timeline, "--image", tmp_path / "start.png"]
    with caplog.at_level("INFO"):
        assert cli.main([str(a) for a in args]) == 0
    frames, _ = read_video(out / "0000-a-fox-s0.mp4")
    assert frames.shape == (24, 48, 80, 3)  # two blocks of 12: the start image is not output
    assert "resized 60x60 to 80x80 and center-cropped to 80x48" in caplog.text


@pytest.mark.parametrize("flag, content, message", [
    ("--image", b"garbage", "is not a readable image"),
    ("--extend", b"garbage", "could not be decoded"),
    ("--timeline", b"[{\"block\": 1}]", "an event needs one of"),
])
def test_cli_bad_start_files_one_line(cli, tmp_path, capsys, flag, content, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    out = tmp_path / "out"
    args = ["--config_path", REPO_ROOT / "configs" / "tiny.yaml", "--data_path", prompts, "--output_folder", out,
            flag, bad]
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not out.exists()


def test_an_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image
    from reward_forcing.interactive import media
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(ValueError, match=r"is 300x200; the limit is 59999 pixels"):
        read_image(path)
