"""reward-forcing: streaming text-to-video with Reward Forcing (arXiv 2512.04678).

Install torch first (``pip install torch==2.13.0`` on CPU, or the CUDA build you want), then
``pip install -e .`` (training and generation), ``".[app]"`` (the web app), ``".[eval]"`` (the evaluation kit) or
``".[dev]"`` (all of it and the tests). flash-attn is an optional extra that no default install pulls.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

APP = ["fastapi>=0.110", "uvicorn>=0.29", "websockets>=12"]
EVAL = ["opencv-python-headless>=4.8", "matplotlib>=3.7"]
QUANT = ["optimum-quanto>=0.2.7"]

setup(
    name="reward-forcing",
    version="0.1.0",
    description="Streaming text-to-video with Reward Forcing: causal Wan2.1 student, EMA-Sink KV cache, Re-DMD",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["reward_forcing", "reward_forcing.*"]),
    package_data={"reward_forcing.serve": ["static/*"]},  # the web app's page
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # python -m reward_forcing.serve (websockets: uvicorn's WebSocket protocol)
        "app": APP,
        # scripts/evaluate.py and reward_forcing.evaluation (OpenCV optical flow, colour statistics), report plots
        "eval": EVAL,
        # everything a newcomer needs, and the tests (httpx: FastAPI's TestClient; pytest-xdist: one worker per core)
        # quantized inference (model.quantize, inference.py --quantize)
        "quant": QUANT,
        "dev": [*APP, *EVAL, *QUANT, "pytest>=8", "pytest-xdist>=3.5", "httpx>=0.27"],
        # browser tests of the web app: the Playwright driver, run against the system chromium (apt install chromium)
        "browser": ["playwright>=1.40"],
        "wandb": ["wandb>=0.18"],
        # VBench dimensions in scripts/evaluate.py (--vbench); optional, pulls its own model dependencies
        "vbench": ["vbench>=0.1.5"],
        # GPU hosts only, installed by hand: pip install --no-build-isolation flash-attn
        "flash": ["flash-attn>=2.7; platform_system=='Linux' and platform_machine=='x86_64'"],
    },
)
