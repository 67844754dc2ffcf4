"""LoRA training (training.lora, peft): only the adapters train, in every trainer mode; exports hold merged plain
weights that load like any checkpoint and give the adapted model's outputs; resume is exact; the byte counts."""
import pytest
import torch

from reward_forcing import checkpoints as ckpt
from reward_forcing.config import ConfigError, LoraSettings, load_config
from reward_forcing.models.wan import WAN_FLAVORS, WanModel
from reward_forcing.training import parallel
from reward_forcing.training.build import build_training_models
from reward_forcing.training.lora import add_adapters, lora_scaling, parameter_bytes
from reward_forcing.training.trainer import Trainer
from conftest import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny.yaml"
PROMPTS = ["a fox runs", "a car drives", "waves crash", "a bird flies", "a dancer spins"]  # as torchrun_train_check.py
LORA = ["training.lora.rank=4", "training.lora.alpha=8"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return WanModel(WAN_FLAVORS["tiny"])


def make_trainer(logdir, *overrides, resume=False):
    cfg = load_config(TINY, [*LORA, *overrides])
    return Trainer(cfg, build_training_models(cfg), PROMPTS, logdir, dist=parallel.init_distributed(), resume=resume)


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(1, 3, c.in_dim, 4, 4, generator=g)
    context = torch.randn(1, c.text_len, c.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), context)


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_adapters_are_all_that_trains_and_start_as_the_identity():
    model = tiny_model()
    reference = forward(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.split(".")[-1] in ("q", "k", "v", "o") or n.endswith(("ffn.0", "ffn.2"))}
    add_adapters(model, LoraSettings(rank=4), frozen_dtype=torch.float32)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(4 * (m.in_features + m.out_features)
                                                           for m in linears.values())
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert torch.equal(forward(model), reference)  # B starts at 0


def test_frozen_weights_take_the_frozen_dtype_and_adapters_stay_float32():
    model = add_adapters(tiny_model(), LoraSettings(rank=2), frozen_dtype=torch.bfloat16)
    dtypes = {(".lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


def test_merged_plain_weights_give_the_adapted_model_outputs():
    settings = LoraSettings(rank=4, alpha=8)
    adapted = add_adapters(tiny_model(), settings, frozen_dtype=torch.float32)
    randomise_adapters(adapted)
    expected = forward(adapted)
    merged = ckpt.merge_lora(adapted.state_dict(), lora_scaling(settings))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = tiny_model(seed=5)
    ckpt.load_weights(plain, merged)  # strict: every plain key present
    assert (forward(plain) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (forward(plain) - forward(tiny_model())).abs().max() > 1e-3  # the adapters did change the model
    # The same from plain weights plus a separate LoRA file in peft's saved layout
    lora_file = {f"base_model.model.{k}": v for k, v in adapted.state_dict().items() if ".lora_" in k}
    apart = ckpt.merge_lora(tiny_model().state_dict(), lora_scaling(settings), lora=lora_file)
    assert all(torch.equal(apart[k], merged[k]) for k in merged)


def test_merge_names_a_broken_adapter():
    sd = {"blocks.0.ffn.0.weight": torch.zeros(4, 3), "blocks.0.ffn.0.lora_A.default.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"'blocks.0.ffn.0' has lora_A only"):
        ckpt.merge_lora(sd, 1.0)
    sd = {"blocks.0.ffn.0.lora_A.default.weight": torch.zeros(2, 3), "blocks.0.ffn.0.lora_B.default.weight":
          torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"no base weight 'blocks.0.ffn.0.weight'"):
        ckpt.merge_lora(sd, 1.0)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match=r"training.lora: rank and alpha must be >= 0"):
        load_config(TINY, ["training.lora.rank=-2"])
    with pytest.raises(ConfigError, match=r"training.lora.targets: is empty"):
        load_config(TINY, ["training.lora.rank=2", "training.lora.targets=[]"])
    model = tiny_model()
    with pytest.raises(ValueError, match=r"training.lora.targets=\['nothing_here'\]"):
        add_adapters(model, LoraSettings(rank=2, targets=["nothing_here"]), frozen_dtype=torch.float32)


def mode_trainer(tmp_path, mode):
    """dmd on the tiny models (critic with adapters too); ode and teacher on the toy world (random weights)."""
    common = [*LORA, "training.max_steps=2", "training.save_every=2", "training.ema_start_step=0"]
    if mode == "dmd":
        cfg = load_config(TINY, [*common, "training.lora.critic=true"])
        prompts = PROMPTS
    else:
        torch.manual_seed(0)
        teacher = tmp_path / "teacher.pt"
        torch.save({"model": WanModel(WAN_FLAVORS["toy"]).state_dict()}, teacher)
        pairs = tmp_path / "pairs.pt"
        torch.save({"states": torch.randn(4, 5, 9, 3, 8, 8), "prompts": ["red fast left", "blue static up"] * 2,
                    "timesteps": torch.tensor([1000.0, 750, 500, 250])}, pairs)
        extra = ([f"training.generator_ckpt={teacher}", f"training.ode_pairs_path={pairs}"] if mode == "ode"
                 else [f"training.teacher_ckpt={teacher}"])
        cfg = load_config(REPO_ROOT / "configs" / "toy" / f"{mode}.yaml", [*common, "training.batch_size=2", *extra])
        prompts = []
    return Trainer(cfg, build_training_models(cfg), prompts, tmp_path / mode, dist=parallel.init_distributed())


@pytest.mark.parametrize("mode", ["dmd", "ode", "teacher"])
def test_every_mode_trains_only_adapters_and_exports_merged_weights(tmp_path, mode):
    trainer = mode_trainer(tmp_path, mode)
    model = trainer.models["teacher" if mode == "teacher" else "generator"]
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if ".lora_B." in k}
    trainer.train()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in adapters.items())  # B left 0: the adapters trained
    export = ckpt.read_state_dict(tmp_path / mode / "checkpoint_model_000002" / "model.pt")
    plain = WanModel(model.config)
    ckpt.load_weights(plain, ckpt.select_generator_weights(export))  # strict: plain keys, adapters merged
    expected = forward(model)
    assert (forward(plain) - expected).abs().max() <= 1e-5 * expected.abs().max()
    if mode == "dmd":
        assert all(".lora_" in n for n, p in trainer.models["critic"].named_parameters() if p.requires_grad)
        assert len(trainer.ema.names) == sum(p.requires_grad for p in model.parameters())  # adapters only
        ckpt.load_weights(WanModel(model.config), ckpt.select_generator_weights(export, use_ema=True))


def test_resume_reproduces_an_uninterrupted_lora_run(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.train()
    part = make_trainer(tmp_path / "part", "training.max_steps=2")
    part.train()
    resumed = make_trainer(tmp_path / "part", resume=True)
    assert resumed.step == 2
    resumed.train()
    a, b = full.m.generator.state_dict(), resumed.m.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_bytes_on_the_meta_device():
    with torch.device("meta"):
        full = WanModel(WAN_FLAVORS["tiny"])
        lora = add_adapters(WanModel(WAN_FLAVORS["tiny"]), LoraSettings(rank=4), frozen_dtype=torch.bfloat16)
    f, lo = parameter_bytes(full), parameter_bytes(lora)
    n = sum(p.numel() for p in full.parameters())
    assert (f.parameters, f.trainable, f.total_bytes) == (n, n, 16 * n)  # fp32 weight, gradient, two moments
    assert lo.parameters == n + lo.trainable and 0 < lo.trainable < n / 5
    assert lo.total_bytes == 2 * n + 16 * lo.trainable  # bf16 frozen weights, fp32 adapters
    assert parameter_bytes(full, trained=False).total_bytes == 4 * n


@pytest.mark.slow
def test_two_ranks_fsdp2_train_adapters_and_resume_in_one_process(tmp_path):
    """FSDP2 over gloo with adapters on frozen weights (one communication group holds both), DCP resume in one
    process, and a merged export."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "tests" / "torchrun_train_check.py"), str(tmp_path), *LORA, "training.lora.critic=true",
           "training.max_steps=2", "training.save_every=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks["step"] == 2 and ranks["ranks"][0] == ranks["ranks"][1] and ranks["ranks"][0]["sharded"]
    export = ckpt.read_state_dict(tmp_path / "checkpoint_model_000002" / "model.pt")
    plain = WanModel(WAN_FLAVORS["tiny"])
    ckpt.load_weights(plain, ckpt.select_generator_weights(export))
    resumed = make_trainer(tmp_path, "training.max_steps=3", "training.lora.critic=true", resume=True)
    assert resumed.step == 2
    expected = forward(resumed.m.generator)
    assert (forward(plain) - expected).abs().max() <= 1e-5 * expected.abs().max()  # the export is the trained model
    frozen = {k: v.clone() for k, v in resumed.m.generator.state_dict().items() if ".lora_" not in k}
    resumed.train()  # step 2 is a generator step (dfake_gen_update_ratio 2): the resumed adapters train on
    assert resumed.step == 3
    assert all(torch.equal(resumed.m.generator.state_dict()[k], v) for k, v in frozen.items())


def test_training_memory_script_counts_the_config_models(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("training_memory", REPO_ROOT / "scripts" / "training_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config_path", str(TINY), "--ranks", "2", *LORA]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"generator", "critic", "teacher", "all"}
    with torch.device("meta"):
        lora = add_adapters(WanModel(WAN_FLAVORS["tiny"]), LoraSettings(rank=4, alpha=8), frozen_dtype=torch.bfloat16)
    assert rows["generator"][2] == "r4" and rows["critic"][2] == "-"
    assert float(rows["generator"][4].rstrip("M")) == pytest.approx(parameter_bytes(lora).trainable / 1e6, abs=0.05)
