"""Test-wide setup: offline hubs, no wandb, deterministic CPU math, and the shared golden folder."""
import os

# Must happen before transformers / diffusers / wandb are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("REWARD_FORCING_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (set REWARD_FORCING_GOLDEN to the shared/golden folder)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_golden(golden_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(golden_dir / name))


@pytest.fixture(scope="session")
def golden_trace(golden_dir):
    return load_golden(golden_dir, "causal_trace.safetensors")


@pytest.fixture
def golden_tiny_model(golden_dir):
    """The reference's tiny DiT (2 layers, dim 64, text_dim 32) with its golden weights, fp32, eval."""
    from reward_forcing.models.wan import WanModel

    model = WanModel.from_flavor("tiny")
    model.load_state_dict(load_golden(golden_dir, "wan_tiny_weights.safetensors"), strict=True)
    return model.eval()
