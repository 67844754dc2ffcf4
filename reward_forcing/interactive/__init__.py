"""Live, steerable streaming: a stateful session over the one block loop, its events and start media.

The start-media readers (``media.py``: images and videos, Pillow and imageio) load on first use, so importing
the pipeline, which stands on ``interactive.session``, loads none of them.
"""
from .events import SWITCH_POLICIES, Event, Reset, SetPrompt, SetSeed, SetSinkAlpha, load_timeline
from .session import Session, SessionBlock

_MEDIA = ("fit_frames", "read_image")

__all__ = ["SWITCH_POLICIES", "Event", "Reset", "SetPrompt", "SetSeed", "SetSinkAlpha", "load_timeline",
           *_MEDIA, "Session", "SessionBlock"]


def __getattr__(name: str):
    if name in _MEDIA:
        from . import media

        return getattr(media, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
