"""Live, steerable streaming: a stateful session over the one block loop, its events and start media."""
from .events import SWITCH_POLICIES, Event, Reset, SetPrompt, SetSeed, SetSinkAlpha, load_timeline
from .media import fit_frames, read_image, read_video_frames
from .session import Session, SessionBlock

__all__ = ["SWITCH_POLICIES", "Event", "Reset", "SetPrompt", "SetSeed", "SetSinkAlpha", "load_timeline",
           "fit_frames", "read_image", "read_video_frames", "Session", "SessionBlock"]
