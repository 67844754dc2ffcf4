"""The toy world: a blob on a torus that the whole recipe (teacher, ODE init, DMD, Re-DMD) learns on a CPU.

``world.py`` makes the data, ``text.py`` encodes its prompts, ``reward.py`` scores motion and ``metrics.py``
measures videos exactly. Training and sampling are the project's own (``train.py`` with ``configs/toy/*.yaml``,
``scripts/generate_ode_pairs.py``); ``scripts/toy_world.py`` runs every stage and writes the report
(docs/toy_world.md).
"""
from .reward import ToyMotionReward
from .text import ToyTextEncoder
from .world import COLOURS, DIRECTIONS, SPEEDS, ToyPrompt, ToyWorld, all_prompts

__all__ = ["ToyMotionReward", "ToyTextEncoder", "COLOURS", "DIRECTIONS", "SPEEDS", "ToyPrompt", "ToyWorld",
           "all_prompts"]
