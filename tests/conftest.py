"""Test-wide setup: offline hubs, no wandb, a fixed seed, the golden vectors and the parity tolerances.

Golden vectors. ``tests/golden/`` holds tensors recorded from the reference implementation on tiny random
models (see ``tests/golden/README.md``). They are part of the repository: a missing file is a test failure,
never a skip. ``REWARD_FORCING_GOLDEN`` may point the tests at another copy of the same files.

Parity tolerances. Every comparison with the reference (golden vectors, or an independent implementation such
as diffusers or transformers used as an oracle) uses the constants below, derived from the float32 noise
floor and never from what one machine happened to print. Re-running the reference itself in float64 moves its
float32 results by up to ``FP32_NOISE_FLOOR`` (4.7e-6, on O(1) values). Our float32 result sits within that
floor of the float64 one too, but with its own rounding: another summation order, another BLAS/oneDNN kernel
for the CPU's vector width (AVX2 vs AVX-512), another thread count. Two such results can therefore differ by
about twice the floor, and more after the errors of 35 chained cached calls add up. ``PARITY_ATOL`` allows
about ten times the floor; the smallest *semantic* error the golden trace can show (the wrong block fused into
the EMA sink) is 5e-4, ten times larger again, and a wrong EMA alpha or a missing sink update moves the
outputs by 4e-3 or more. Closed-form elementwise maths (add_noise, flow <-> x0, pixel normalisation) involves
one or two roundings per element, so its floor is a few float32 ulps of the values compared:
``elementwise_atol``. Consistency checks between two of our own code paths (streaming == full, batch ==
single, checkpointing == plain) are not parity checks and keep their own, tighter, tolerances.
"""
import dataclasses
import json
import os
import socket

# Must happen before transformers / diffusers / wandb are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite runs on every core (README: ``pytest -n auto``, one pytest-xdist worker per core): one torch thread per
# worker, inherited by the processes the tests start, fills the cores without oversubscribing them, and a result
# compared across processes is computed with the same thread count on both sides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("REWARD_FORCING_GOLDEN", Path(__file__).resolve().parent / "golden"))

# -- parity tolerances (see the module docstring) -------------------------------------------------------------
FP32_NOISE_FLOOR = 4.7e-6  # largest |fp32 - fp64| of the reference's own outputs (any call of the golden trace)
PARITY_ATOL = 5e-5  # network outputs vs the reference: ~10x the floor, 10x below the smallest semantic error
FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0
ELEMENTWISE_ULPS = 4  # one or two roundings per element on each side, plus FMA vs separate multiply-add


def free_port() -> int:
    """A TCP port free on this machine now (for a test's gloo rendezvous or server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elementwise_atol(expected: torch.Tensor) -> float:
    """Parity tolerance for closed-form elementwise float32 maths: a few ulps at the magnitude compared."""
    return ELEMENTWISE_ULPS * FP32_EPS * max(1.0, expected.detach().abs().max().item())


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


# -- golden vectors --------------------------------------------------------------------------------------------
def golden_path(name: str, golden_dir: Path = GOLDEN_DIR) -> Path:
    """Path of one golden file; fails the test (not skips it) when the file is missing."""
    path = Path(golden_dir) / name
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing: the parity tests need tests/golden/ from the repository "
                    f"(or REWARD_FORCING_GOLDEN pointing at a full copy of it)", pytrace=False)
    return path


def load_golden(golden_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(golden_path(name, golden_dir)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden folder {GOLDEN_DIR} not found: the parity tests need tests/golden/ from the "
                    f"repository (or REWARD_FORCING_GOLDEN pointing at a full copy of it)", pytrace=False)
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden_trace(golden_dir):
    return load_golden(golden_dir, "causal_trace.safetensors")


@pytest.fixture
def golden_tiny_model(golden_dir):
    """The reference's tiny DiT (2 layers, dim 64, text_dim 32) with its golden weights, fp32, eval."""
    from reward_forcing.models.wan import WanModel

    model = WanModel.from_flavor("tiny")
    recorded = json.loads(golden_path("wan_tiny_config.json", golden_dir).read_text())["constructor_kwargs"]
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    recorded.pop("model_type")  # "t2v": the only type this repository builds
    ours = {k: ours.get(k) for k in recorded}
    assert ours == recorded, f"the 'tiny' flavor differs from tests/golden/wan_tiny_config.json: {ours} != {recorded}"
    model.load_state_dict(load_golden(golden_dir, "wan_tiny_weights.safetensors"), strict=True)
    return model.eval()


# -- scheduling ------------------------------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs whole scripts for ten seconds or more; scheduled first")


def pytest_collection_modifyitems(config, items):
    """Slow tests first: with parallel workers, the longest test then overlaps the rest of the suite instead of
    starting last and running alone (the order is otherwise the collection order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
