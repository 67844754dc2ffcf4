"""The live web app: ``python -m reward_forcing.serve --config_path configs/X.yaml`` (docs/interactive.md).

Needs the ``app`` extra (``pip install -e ".[app]"``): fastapi, uvicorn, websockets. They load on first use, so a
missing extra is one line naming the install command.
"""
from ..extras import require

__all__ = ["ServeOptions", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        require("app", "the web app (reward_forcing.serve)")
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
