"""TAEHV preview decoder: loads taew2_1 by its key names, streams block by block == whole clip (random weights)."""
import pytest
import torch

from reward_forcing.models.taehv import TAEHVDecoder

# The decoder entries of the public taew2_1 checkpoint (names and shapes; the file also holds encoder.* entries).
TAEW2_1_DECODER = {
    "decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,),
    **{f"decoder.{i}.conv.{j}.weight": (256, 512 if j == 0 else 256, 3, 3) for i in (3, 4, 5) for j in (0, 2, 4)},
    **{f"decoder.{i}.conv.{j}.bias": (256,) for i in (3, 4, 5) for j in (0, 2, 4)},
    "decoder.7.conv.weight": (256, 256, 1, 1), "decoder.8.weight": (128, 256, 3, 3),
    **{f"decoder.{i}.conv.{j}.weight": (128, 256 if j == 0 else 128, 3, 3) for i in (9, 10, 11) for j in (0, 2, 4)},
    **{f"decoder.{i}.conv.{j}.bias": (128,) for i in (9, 10, 11) for j in (0, 2, 4)},
    "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
    **{f"decoder.{i}.conv.{j}.weight": (64, 128 if j == 0 else 64, 3, 3) for i in (15, 16, 17) for j in (0, 2, 4)},
    **{f"decoder.{i}.conv.{j}.bias": (64,) for i in (15, 16, 17) for j in (0, 2, 4)},
    "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,),
}


def _random_checkpoint(seed=0, first_grow_out=256):
    """Random weights in the checkpoint's layout: PyTorch's default conv init (activations stay O(1))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {f"decoder.{k}": v for k, v in TAEHVDecoder().decoder.state_dict().items()}
        state["decoder.7.conv.weight"] = torch.randn(first_grow_out, 256, 1, 1) / 16
        state["decoder.22.weight"] *= 20  # pixels around mid grey with visible structure, not clamped flat
        state["decoder.22.bias"].fill_(0.5)
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # ignored
    return state


@pytest.fixture(scope="module")
def decoder():
    model = TAEHVDecoder()
    model.load_decoder_state_dict(_random_checkpoint())
    return model.eval()


def test_key_names_and_shapes_match_taew2_1(tmp_path):
    model = TAEHVDecoder()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TAEW2_1_DECODER
    path = tmp_path / "taew2_1.pth"
    torch.save(_random_checkpoint(1), path)
    loaded = TAEHVDecoder.from_file(path)
    assert torch.equal(loaded.state_dict()["decoder.22.bias"], _random_checkpoint(1)["decoder.22.bias"])
    from safetensors.torch import save_file
    save_file(_random_checkpoint(1), tmp_path / "taew2_1.safetensors")
    again = TAEHVDecoder.from_file(tmp_path / "taew2_1.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))


def test_a_grow_layer_trained_with_a_larger_stride_keeps_its_last_time_step():
    state = _random_checkpoint(2, first_grow_out=512)
    model = TAEHVDecoder()
    model.load_decoder_state_dict(state)
    assert torch.equal(model.state_dict()["decoder.7.conv.weight"], state["decoder.7.conv.weight"][256:])


def test_bad_checkpoints_are_named(tmp_path):
    state = _random_checkpoint()
    del state["decoder.22.bias"]
    with pytest.raises(ValueError, match=r"not a taew2_1 decoder: missing keys \['decoder.22.bias'\]"):
        TAEHVDecoder().load_decoder_state_dict(state)
    state = _random_checkpoint()
    state["decoder.8.weight"] = torch.zeros(128, 256, 1, 1)
    with pytest.raises(ValueError, match=r"decoder.8.weight: checkpoint shape \(128, 256, 1, 1\)"):
        TAEHVDecoder().load_decoder_state_dict(state)
    with pytest.raises(FileNotFoundError, match="TAEHV weights .* do not exist"):
        TAEHVDecoder.from_file(tmp_path / "missing.pth")


def test_streaming_equals_the_whole_clip(decoder):
    latents = torch.randn(1, 9, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    whole = decoder.decode(latents)
    assert whole.shape == (1, 1 + 4 * 8, 3, 32, 48) and whole.min() >= -1 and whole.max() <= 1
    assert whole.std() > 0.05 and (whole.abs() == 1).float().mean() < 0.01  # structure, not clamped flat
    stream = decoder.stream_decoder()
    blocks = [stream.decode(latents[:, i:i + 3]) for i in range(0, 9, 3)]
    assert [b.shape[1] for b in blocks] == [9, 12, 12]
    assert (torch.cat(blocks, 1) - whole).abs().max() <= 1e-6
    stream.reset()
    frames = torch.cat([stream.decode(latents[:, i:i + 1]) for i in range(9)], 1)  # one latent at a time
    assert (frames - whole).abs().max() <= 1e-6


def test_the_decoder_state_reaches_back_a_bounded_number_of_latents():
    """A memory block sees only its previous input, so a change of latent 0 reaches the frames of latents 1..8
    (3 memory blocks per stage, running at 1, 1 and 1/2 latent per step: 3 + 3 + 2 latents), not later ones."""
    model = TAEHVDecoder()
    model.load_decoder_state_dict(_random_checkpoint(4))
    latents = torch.randn(1, 12, 16, 2, 2, generator=torch.Generator().manual_seed(5))
    changed = latents.clone()
    changed[:, 0] += 1
    a, b = model.decode(latents), model.decode(changed)
    assert a.shape[1] == 45  # latent k >= 1 gives frames 4k - 3 .. 4k
    per_latent = [(a[:, max(0, 4 * k - 3):4 * k + 1] - b[:, max(0, 4 * k - 3):4 * k + 1]).abs().max().item()
                  for k in range(12)]
    assert all(d > 0 for d in per_latent[:9]) and per_latent[9:] == [0, 0, 0], per_latent


def test_a_session_previews_with_taehv():
    from reward_forcing.build import build_pipeline
    from reward_forcing.config import load_config
    from reward_forcing.interactive import Session
    from conftest import REPO_ROOT

    pipe = build_pipeline(load_config(REPO_ROOT / "configs" / "tiny.yaml"))
    taehv = TAEHVDecoder()
    taehv.load_decoder_state_dict(_random_checkpoint(6))
    blocks = Session(pipe, "a fox", seed=1, height=16, width=16, decoder_model=taehv).blocks(3)
    assert [b.frames.shape[1:] for b in blocks] == [(9, 3, 16, 16), (12, 3, 16, 16), (12, 3, 16, 16)]
    whole = taehv.decode(torch.cat([b.latents for b in blocks], 1))
    assert (torch.cat([b.frames for b in blocks], 1) - whole).abs().max() <= 1e-6
