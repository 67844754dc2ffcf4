"""Wan VAE wrapper: golden parity (official WanVAE_), streaming == full decode, shapes, error messages."""
import json

import pytest
import torch
from safetensors.torch import load_file

from reward_forcing.models.vae import WAN_LATENT_MEAN, WAN_LATENT_STD, WanVAE
from conftest import PARITY_ATOL


@pytest.fixture(scope="module")
def tiny_vae():
    return WanVAE.tiny(seed=0)


@pytest.fixture(scope="module")
def golden_vae(golden_dir):
    arch = json.loads((golden_dir / "vae_tiny.json").read_text())["constructor_kwargs"]
    assert arch.pop("dropout") == 0.0
    sd = load_file(golden_dir / "vae_tiny_original.safetensors")
    return WanVAE.from_original_state_dict(sd, base_dim=arch.pop("dim"), **arch)


@pytest.fixture(scope="module")
def golden_io(golden_dir):
    return load_file(golden_dir / "vae_tiny_io.safetensors")


def test_constants_match_golden(golden_dir, golden_io):
    meta = json.loads((golden_dir / "vae_tiny.json").read_text())
    assert list(WAN_LATENT_MEAN) == pytest.approx(meta["latents_mean"], abs=0)
    assert list(WAN_LATENT_STD) == pytest.approx(meta["latents_std"], abs=0)
    assert torch.equal(golden_io["latents_mean"], torch.tensor(WAN_LATENT_MEAN))
    assert torch.equal(golden_io["latents_std"], torch.tensor(WAN_LATENT_STD))


def test_decode_matches_golden(golden_vae, golden_io):
    z = golden_io["z"].permute(0, 2, 1, 3, 4)  # golden is [B, C, F, H, W]; pipeline layout is [B, F, C, H, W]
    expected = golden_io["decoded_raw"].clamp(-1, 1).permute(0, 2, 1, 3, 4)
    pixels = golden_vae.decode(z)
    assert pixels.shape == expected.shape == (1, 21, 3, 32, 48)
    err = (pixels - expected).abs().max().item()
    print(f"VAE decode max abs err {err:.3g}")
    assert err <= PARITY_ATOL


def test_stream_decode_matches_golden(golden_vae, golden_io):
    z = golden_io["z"].permute(0, 2, 1, 3, 4)
    expected = golden_io["decoded_raw"].clamp(-1, 1).permute(0, 2, 1, 3, 4)
    dec = golden_vae.stream_decoder()
    pixels = torch.cat([dec.decode(z[:, :3]), dec.decode(z[:, 3:])], dim=1)
    assert (pixels - expected).abs().max().item() <= PARITY_ATOL


def test_encode_matches_golden(golden_vae, golden_io):
    video = golden_io["video_in"].permute(0, 2, 1, 3, 4)
    expected = golden_io["encoded"].permute(0, 2, 1, 3, 4)
    latents = golden_vae.encode(video)
    assert latents.shape == expected.shape == (1, 3, 16, 4, 6)
    err = (latents - expected).abs().max().item()
    print(f"VAE encode max abs err {err:.3g}")
    assert err <= PARITY_ATOL


@pytest.mark.parametrize("chunks", [[3, 3], [1, 2, 3], [1, 1, 1, 1, 1, 1], [6]])
def test_stream_decode_equals_full_decode(tiny_vae, chunks):
    latents = torch.randn(1, sum(chunks), 16, 2, 3)
    full = tiny_vae.decode(latents)
    dec = tiny_vae.stream_decoder()
    parts, start = [], 0
    for n in chunks:
        out = dec.decode(latents[:, start:start + n])
        assert out.shape[1] == (4 * n - 3 if start == 0 else 4 * n)
        parts.append(out)
        start += n
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_decode_matches_diffusers_decode(tiny_vae):
    """diffusers' own (non-streaming) decode agrees up to float rounding (see WanStreamDecoder)."""
    latents = torch.randn(1, 4, 16, 2, 3)
    ours = tiny_vae.decode(latents)
    with torch.no_grad():
        ref = tiny_vae.model.decode(tiny_vae.denormalise(latents)).sample.permute(0, 2, 1, 3, 4)
    assert (ours - ref).abs().max().item() <= PARITY_ATOL


def test_stream_decode_pipeline_blocks_and_reset(tiny_vae):
    """Blocks of 3 latent frames: 9 pixel frames for the first block, 12 for each later one."""
    latents = torch.randn(2, 9, 16, 2, 2)
    full = tiny_vae.decode(latents)
    assert full.shape == (2, 33, 3, 16, 16)
    dec = tiny_vae.stream_decoder()
    for _ in range(2):  # second pass checks that reset() starts a new video
        outs = [dec.decode(latents[:, i:i + 3]) for i in range(0, 9, 3)]
        assert [o.shape[1] for o in outs] == [9, 12, 12]
        assert torch.equal(torch.cat(outs, dim=1), full)
        dec.reset()


def test_round_trip_shapes_and_range(tiny_vae):
    pixels = torch.rand(2, 9, 3, 16, 24) * 2 - 1
    latents = tiny_vae.encode(pixels)
    assert latents.shape == (2, 3, 16, 2, 3)
    assert latents.dtype == torch.float32
    decoded = tiny_vae.decode(latents)
    assert decoded.shape == (2, 9, 3, 16, 24)
    assert decoded.abs().max() <= 1.0
    assert not decoded.requires_grad
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        tiny_vae.encode(pixels[:, :8])


def test_tiny_is_seeded_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, b = WanVAE.tiny(seed=3), WanVAE.tiny(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not any(p.requires_grad for p in a.parameters())


def test_missing_checkpoint_message(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        WanVAE.from_wan_pth(path)  # the model names the file ...
    from reward_forcing.build import build_vae
    from reward_forcing.config import load_config

    with pytest.raises(FileNotFoundError) as info:  # ... the builder, which knows the layout, says how to get it
        build_vae(load_config(overrides=[f"checkpoint_root={tmp_path}"]))
    assert "Wan2.1_VAE.pth" in str(info.value) and "bash download_checkpoints.sh" in str(info.value)


def test_vae_geometry():
    vae = WanVAE.tiny()
    assert (vae.spatial_stride, vae.temporal_stride) == (8, 4)
    assert vae.latent_size(480, 832) == (60, 104) and vae.video_frames(21) == 81 and vae.video_frames(120) == 477
    assert vae.chunk_frames(3, first=True) == 9 and vae.chunk_frames(3, first=False) == 12
    with pytest.raises(ValueError, match="50x80"):
        vae.latent_size(50, 80)
    frames = vae.decode(torch.zeros(1, 3, 16, 2, 2))
    assert frames.shape[1] == vae.video_frames(3) and frames.shape[-2:] == (16, 16)


def test_from_wan_pth_loads_original_keys(tmp_path, golden_dir):
    sd = load_file(golden_dir / "vae_tiny_original.safetensors")
    ref = WanVAE.from_original_state_dict(sd, base_dim=8)
    path = tmp_path / "vae.pth"
    torch.save(sd, path)
    # from_wan_pth builds the real-size architecture, so a tiny file must fail loudly, not silently.
    with pytest.raises(RuntimeError, match="size mismatch"):
        WanVAE.from_wan_pth(path)
    assert ref.dtype == torch.float32 and ref.device.type == "cpu"
