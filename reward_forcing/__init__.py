"""reward-forcing: streaming text-to-video with Reward Forcing (arXiv 2512.04678).

Modules: ``models.wan`` (the Wan2.1 DiT, three call modes), ``models.kv_cache`` (window + sink policies),
``schedule`` (shifted flow matching), ``config`` (typed OmegaConf configs).
"""
__version__ = "0.1.0"
