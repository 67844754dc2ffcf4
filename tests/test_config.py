"""Configs: the schema is configs/default.yaml, shipped configs load, and bad input names key and file."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reward_forcing.config import Config, ConfigError, load_config
from reward_forcing.models.kv_cache import CausalSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_the_schema():
    assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "default.yaml")) == \
        OmegaConf.to_container(OmegaConf.structured(Config))


def test_shipped_configs_load():
    ref = load_config(CONFIGS / "reward_forcing.yaml")
    assert (ref.model.generator, ref.model.teacher) == ("1.3B", "14B")
    assert isinstance(ref.causal, CausalSpec) and ref.causal.sink_policy == "ema" and ref.causal.local_attn_size == 9
    assert ref.training.lr == 2e-6 and ref.training.beta == 2.0
    tiny = load_config(CONFIGS / "tiny.yaml", ["causal.sink_policy=static", "video.num_output_frames=9"])
    assert tiny.model.generator == "tiny" and tiny.model.random_init
    assert tiny.causal.sink_policy == "static" and tiny.video.num_output_frames == 9


@pytest.mark.parametrize("yaml_text,needle", [
    ("model:\n  genrator: tiny\n", "model.genrator"),
    ("causal:\n  local_attn_size: nine\n", "causal.local_attn_size"),
    ("causal:\n  sink_policy: lru\n", "causal.sink_policy"),
    ("causal:\n  local_attn_size: 4\n", "causal"),
    ("video:\n  num_output_frames: 20\n", "video.num_output_frames"),
    ("model:\n  generator: 7B\n", "model.generator"),
])
def test_bad_values_name_key_and_file(tmp_path, yaml_text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("override,needle", [
    ("training.save_every=0", "training.save_every: must be >= 1, got 0"),
    ("training.max_steps=-3", "training.max_steps: must be >= 1"),
    ("training.beta=nan", "training.beta: must be a finite number"),
    ("training.keep_last_checkpoints=0", "training.keep_last_checkpoints: must be >= 1 (or null"),
    ("training.lr=0", "training.lr: must be > 0"),
    ("training.beta2=1.0", "training.beta2: must be in [0, 1)"),
    ("training.ema_weight=1.5", "training.ema_weight"),
    ("training.min_timestep=990", "training.min_timestep"),
    ("training.log_every=0", "training.log_every"),
    ("training.global_batch_size=-8", "training.global_batch_size"),
])
def test_nonsensical_training_values_fail_at_load(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "reward_forcing.yaml", [override])
    assert needle in str(err.value)


def test_keep_last_checkpoints_null_keeps_all():
    assert load_config(CONFIGS / "tiny.yaml", ["training.keep_last_checkpoints=null"]).training.keep_last_checkpoints \
        is None
    assert load_config(CONFIGS / "tiny.yaml").training.keep_last_checkpoints == 2


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="causal.foo"):
        load_config(CONFIGS / "tiny.yaml", ["causal.foo=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_self_forcing_ablation_is_plain_dmd():
    cfg = load_config(CONFIGS / "self_forcing.yaml")
    assert cfg.training.beta == 0.0 and cfg.causal.sink_policy == "ema"


def test_model_checkpoint_in_a_config_file_is_relative_to_that_file(tmp_path):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "c.yaml"
    config.write_text("model:\n  checkpoint: weights.pt\n")
    assert load_config(config).model.checkpoint == str(tmp_path / "sub" / "weights.pt")
    config.write_text(f"model:\n  checkpoint: {tmp_path / 'abs.pt'}\n")
    assert load_config(config).model.checkpoint == str(tmp_path / "abs.pt")  # absolute paths stay
    # a command-line override is from the working directory, like every other path
    assert load_config(config, ["model.checkpoint=rel/w.pt"]).model.checkpoint == "rel/w.pt"
    assert load_config(CONFIGS / "toy" / "student.yaml").model.checkpoint == str(
        CONFIGS / "toy" / "student.pt")
