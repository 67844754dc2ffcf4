"""Optional dependency groups (``pip install -e ".[app]"`` / ``".[eval]"``) and the one-line error when one is missing.

Training and generation need only the core requirements; the web app and the evaluation kit (with the toy world's
report plots) have extras of their own. ``pip install -e ".[dev]"``, the README's install command, pulls both.
"""
from __future__ import annotations

import importlib.util

EXTRAS = {
    "app": ("fastapi", "uvicorn", "websockets"),  # python -m reward_forcing.serve
    "eval": ("cv2", "matplotlib"),  # scripts/evaluate.py, reward_forcing.evaluation, toy-world report plots
    "quant": ("optimum.quanto",),  # model.quantize / inference.py --quantize
}
_PIP_NAMES = {"cv2": "opencv-python-headless", "optimum.quanto": "optimum-quanto"}


class MissingExtra(ImportError):
    """An optional dependency group is not installed; ``str()`` is one line with the install command."""


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming ``what`` and ``pip install -e ".[extra]"`` if a package of ``extra`` is
    missing."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(_PIP_NAMES.get(m, m) for m in missing)
        raise MissingExtra(f"{what} needs {names}: pip install -e \".[{extra}]\" (or pip install "
                           f"\"reward-forcing[{extra}]\")")
