"""Community checkpoints (configs/community/): each release's file layout, as its own save and load code writes and
reads it (docs/community.md), loads into our WanModel - the real 1.3B key set on the meta device - and streams
with that release's cache settings (tiny models in the same layout)."""
import pytest
import torch

from reward_forcing import checkpoints as ckpt
from reward_forcing.build import build_pipeline
from reward_forcing.config import load_config
from reward_forcing.models.wan import WAN_FLAVORS, WanModel, init_random_
from conftest import REPO_ROOT

COMMUNITY = REPO_ROOT / "configs" / "community"
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def release_layout(name: str, weights: dict[str, torch.Tensor]) -> dict:
    """A DiT state dict wrapped the way each project's trainer / release stores its generator."""
    clean = {f"model.{k}": v for k, v in weights.items()}  # the DiT sits in a wrapper as self.model
    fsdp_ema = {f"model._fsdp_wrapped_module.{k}": v for k, v in weights.items()}  # EMA read through FSDP
    return {
        "self_forcing": {"generator_ema": clean},
        "causal_forcing_chunkwise": {"generator": clean},
        "causal_forcing_framewise": {"generator_ema": fsdp_ema},
        "longlive": {"generator": clean},
        "rolling_forcing": {"generator": clean, "critic": clean, "generator_ema": fsdp_ema},
        "reward_forcing": clean,  # flat
    }[name]


def longlive_lora(weights: dict[str, torch.Tensor], rank: int, seed: int = 0) -> dict:
    """LongLive's lora.pt: peft adapters of every linear map of every transformer layer, keys as peft saves them
    around the bare DiT, for the generator and the critic."""
    g = torch.Generator().manual_seed(seed)
    layers = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".weight") and k.startswith("blocks.")
                     and k.rsplit(".", 1)[0].split(".", 2)[2] in LORA_TARGETS})
    adapters = {}
    for layer in layers:
        out_f, in_f = weights[f"{layer}.weight"].shape
        meta = weights[f"{layer}.weight"].is_meta
        make = (lambda *s: torch.empty(*s, device="meta")) if meta else (lambda *s: 0.02 * torch.randn(*s, generator=g))
        adapters[f"base_model.model.{layer}.lora_A.weight"] = make(rank, in_f)
        adapters[f"base_model.model.{layer}.lora_B.weight"] = make(out_f, rank)
    return {"generator_lora": adapters, "critic_lora": dict(adapters), "step": 3000}


NAMES = ["self_forcing", "causal_forcing_chunkwise", "causal_forcing_framewise", "longlive", "rolling_forcing",
         "reward_forcing"]


@pytest.mark.parametrize("name", NAMES)
def test_release_layout_loads_the_1_3b_keys_strictly_on_the_meta_device(name):
    cfg = load_config(COMMUNITY / f"{name}.yaml")
    with torch.device("meta"):
        released = WanModel(WAN_FLAVORS["1.3B"]).state_dict()
        target = WanModel(WAN_FLAVORS["1.3B"], cfg.causal)
    assert len(released) == ckpt.DIT_NUM_KEYS["Wan2.1-T2V-1.3B"]
    weights = ckpt.select_generator_weights(release_layout(name, released), use_ema=cfg.model.use_ema)
    if cfg.model.lora:
        lora = longlive_lora(released, rank=256)
        assert len(lora["generator_lora"]) == 2 * 10 * WAN_FLAVORS["1.3B"].num_layers  # 300 adapted layers
        weights = ckpt.merge_lora(weights, cfg.model.lora_scale, lora=lora["generator_lora"])
    ckpt.load_weights(target, weights)  # strict: every key of the 1.3B DiT, nothing else


def test_the_wrong_sub_dict_is_named():
    with torch.device("meta"):
        released = WanModel(WAN_FLAVORS["tiny"]).state_dict()
    with pytest.raises(ValueError, match="--use_ema was given but .* has no 'generator_ema'"):
        ckpt.select_generator_weights(release_layout("causal_forcing_chunkwise", released), use_ema=True)


@pytest.mark.parametrize("name", NAMES)
def test_each_config_streams_its_release_layout(tmp_path, name):
    """The release's file (tiny weights, same layout) through model.checkpoint / model.use_ema / model.lora and
    the config's cache settings: the pipeline's generator holds exactly the released (merged) weights."""
    torch.manual_seed(0)
    weights = init_random_(WanModel(WAN_FLAVORS["tiny"]), seed=3).state_dict()
    release = tmp_path / "release.pt"
    torch.save(release_layout(name, weights), release)
    overrides = ["model.generator=tiny", "model.text_encoder=tiny", "model.vae=tiny", "video.height=48",
                 "video.width=80", f"model.checkpoint={release}"]
    expected = dict(weights)
    cfg_file = load_config(COMMUNITY / f"{name}.yaml")
    if cfg_file.model.lora:
        lora = longlive_lora(weights, rank=4)
        torch.save(lora, tmp_path / "lora.pt")
        overrides.append(f"model.lora={tmp_path / 'lora.pt'}")
        expected = ckpt.merge_lora(weights, cfg_file.model.lora_scale, lora=lora["generator_lora"])
        assert any(not torch.equal(expected[k], weights[k]) for k in weights)
    cfg = load_config(COMMUNITY / f"{name}.yaml", overrides)
    pipe = build_pipeline(cfg)
    got = pipe.generator.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert pipe.generator.causal == cfg_file.causal
    frames = 2 * cfg.causal.frames_per_block
    _, latents = pipe.generate(["a fox runs"], num_frames=frames, height=48, width=80, decode=False)
    assert latents.shape[1] == frames and torch.isfinite(latents).all()
