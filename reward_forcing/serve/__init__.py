"""The live web app: ``python -m reward_forcing.serve --config_path configs/X.yaml`` (docs/interactive.md)."""
from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
