"""umt5 text encoder: golden parity with Wan's T5Encoder, the 512-row zero-padded output, negative cache."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import UMT5EncoderModel

from reward_forcing.models.text_encoder import (
    TextEncoder,
    build_tiny_tokenizer,
    clean_prompt,
    convert_wan_t5_state_dict,
    umt5_config_from_wan,
    umt5_xxl_config,
)
from conftest import PARITY_ATOL


@pytest.fixture(scope="module")
def tiny():
    return TextEncoder.tiny(seed=0)


def _golden_encoder(golden_dir):
    kwargs = json.loads((golden_dir / "t5_tiny.json").read_text())["constructor_kwargs"]
    kwargs.pop("dropout")  # the golden ran in eval mode
    encoder = UMT5EncoderModel(umt5_config_from_wan(**kwargs)).eval()
    sd = convert_wan_t5_state_dict(load_file(golden_dir / "t5_tiny_original.safetensors"))
    result = encoder.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return encoder


def test_config_matches_golden_equivalent(golden_dir):
    meta = json.loads((golden_dir / "t5_tiny.json").read_text())
    kwargs = dict(meta["constructor_kwargs"])
    kwargs.pop("dropout")
    config = umt5_config_from_wan(**kwargs)
    for name, value in meta["umt5_config_equivalent"].items():
        assert getattr(config, name) == value, name


def test_umt5_xxl_config():
    c = umt5_xxl_config()
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_layers, c.num_heads) == (256384, 4096, 64, 10240, 24, 64)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.is_gated_act and c.dense_act_fn == "gelu_new" and c.layer_norm_epsilon == 1e-6


def test_golden_parity(golden_dir):
    encoder = _golden_encoder(golden_dir)
    io = load_file(golden_dir / "t5_tiny_io.safetensors")
    with torch.no_grad():
        out = encoder(input_ids=io["ids"], attention_mask=io["mask"]).last_hidden_state
    err = (out - io["output"]).abs().max().item()
    print(f"T5 golden max abs err (all rows) {err:.3g}")
    assert err <= PARITY_ATOL


def test_convert_rejects_unknown_keys():
    with pytest.raises(KeyError, match="pos_embedding"):
        convert_wan_t5_state_dict({"pos_embedding.embedding.weight": torch.zeros(1)})


def test_forward_pads_to_512_and_zeroes_past_length(tiny):
    assert tiny.text_len == 512 and tiny.dim == 32
    prompts = ["a cat", "A much longer prompt about a dog running on the beach."]
    out = tiny(prompts)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32 and not out.requires_grad
    for i, p in enumerate(prompts):
        ids = tiny.tokenizer(clean_prompt(p))["input_ids"]
        n = len(ids)
        assert ids[-1] == tiny.tokenizer.eos_token_id
        assert out[i, n:].abs().sum() == 0
        assert out[i, :n].abs().min(dim=-1).values.gt(0).all()  # every real row (</s> included) is non-zero
        # The masked encoder sees only the prompt: same rows as encoding the unpadded sequence alone.
        with torch.no_grad():
            alone = tiny.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert torch.allclose(out[i, :n], alone, atol=1e-5)


def test_forward_truncates_long_prompts(tiny):
    out = tiny(["word " * 400])  # 2400 characters -> truncated to 512 tokens, no zero rows
    assert out.shape == (1, 512, 32)
    assert out[0].abs().sum(dim=-1).gt(0).all()


def test_prompt_cleaning(tiny):
    assert clean_prompt("  a\t cat &amp;amp;\n dog  ") == "a cat & dog"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake
    assert torch.equal(tiny(["  a \n\n cat "]), tiny(["a cat"]))


def test_negative_prompt_cache(tiny, monkeypatch):
    calls = []
    original = TextEncoder.forward

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(TextEncoder, "forward", counting)
    a = tiny.encode_negative("blurry", 2)
    b = tiny.encode_negative("blurry", 2)
    assert a is b and len(calls) == 1 and a.shape == (2, 512, 32)
    assert torch.equal(a[0], a[1])
    tiny.encode_negative("blurry", 3)
    tiny.encode_negative("static", 3)
    assert len(calls) == 3
    assert torch.equal(tiny.encode_negative("blurry", 2), original(tiny, ["blurry", "blurry"]))


def test_tiny_is_seeded_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, b, c = TextEncoder.tiny(seed=1), TextEncoder.tiny(seed=1), TextEncoder.tiny(seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a(["x"]), b(["x"]))
    assert not torch.equal(a(["x"]), c(["x"]))


def test_tiny_tokenizer():
    tok = build_tiny_tokenizer()
    enc = tok(["ab c"], padding="max_length", max_length=8, return_tensors="pt")
    assert enc["input_ids"].tolist() == [[3, 68, 69, 3, 70, 1, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        TextEncoder.from_wan_folder(tmp_path)
    assert str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth") in str(info.value)
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").touch()
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        TextEncoder.from_wan_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_hf_folder(tmp_path / "Wan2.1-T2V-1.3B-Diffusers")


def test_builder_says_how_to_get_missing_files(tmp_path):
    """Models name the missing file; the builder, which knows the checkpoint layout, adds the download hint."""
    from reward_forcing.build import build_text_encoder
    from reward_forcing.checkpoints import ASSETS
    from reward_forcing.config import load_config

    folder = tmp_path / ASSETS["wan_1_3b"].relpath
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        build_text_encoder(load_config(overrides=[f"checkpoint_root={tmp_path}"]))
    msg = str(info.value)
    assert "models_t5_umt5-xxl-enc-bf16.pth" in msg and "bash download_checkpoints.sh" in msg


def test_from_hf_folder_round_trip(tmp_path, tiny):
    """save_pretrained in the Diffusers layout (text_encoder/ + tokenizer/) and in one folder, then reload."""
    tiny.encoder.save_pretrained(tmp_path / "repo" / "text_encoder")
    tiny.tokenizer.save_pretrained(tmp_path / "repo" / "tokenizer")
    tiny.encoder.save_pretrained(tmp_path / "single")
    tiny.tokenizer.save_pretrained(tmp_path / "single")
    expected = tiny(["a red fox"])
    for folder in (tmp_path / "repo", tmp_path / "single"):
        loaded = TextEncoder.from_hf_folder(folder, dtype=torch.float32)
        assert torch.equal(loaded(["a red fox"]), expected)
    bf16 = TextEncoder.from_hf_folder(tmp_path / "single")
    assert bf16.dtype == torch.bfloat16 and bf16(["a red fox"]).dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.encoder.parameters())


def test_from_wan_folder_with_tiny_weights(tmp_path, golden_dir, monkeypatch):
    """Exercise the meta-device + assign loading path with the golden tiny weights (xxl config patched)."""
    import reward_forcing.models.text_encoder as te

    kwargs = json.loads((golden_dir / "t5_tiny.json").read_text())["constructor_kwargs"]
    kwargs.pop("dropout")
    monkeypatch.setattr(te, "umt5_xxl_config", lambda: umt5_config_from_wan(**kwargs))
    torch.save(load_file(golden_dir / "t5_tiny_original.safetensors"), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    build_tiny_tokenizer().save_pretrained(tmp_path / "google" / "umt5-xxl")
    enc = TextEncoder.from_wan_folder(tmp_path, dtype=torch.float32)
    assert enc.encoder.shared.weight is enc.encoder.encoder.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in enc.encoder.parameters())
    io = load_file(golden_dir / "t5_tiny_io.safetensors")
    with torch.no_grad():
        out = enc.encoder(input_ids=io["ids"], attention_mask=io["mask"]).last_hidden_state
    assert (out - io["output"]).abs().max().item() <= PARITY_ATOL
    assert enc(["a cat"]).shape == (1, 512, 32)
