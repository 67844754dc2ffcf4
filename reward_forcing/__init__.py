"""reward-forcing: streaming text-to-video with Reward Forcing (arXiv 2512.04678).

docs/architecture.md is the map of the package (its layers, its rules, where to fork an ablation). Entry points:
``inference.py``, ``train.py``, ``python -m reward_forcing.serve`` and ``scripts/``; in Python,
``build.build_pipeline(load_config(...))`` gives a :class:`~reward_forcing.pipeline.StreamingPipeline`.
"""
__version__ = "0.1.0"
