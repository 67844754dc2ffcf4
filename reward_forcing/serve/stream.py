"""The model side of the web app: a thread that owns the session, and the queue that hands blocks to the network.

The model thread is the only code that touches the models. It applies the commands the network loop posts
(prompt switches, seeds, resets, pause) between blocks - so every change takes effect at a block boundary
and is recorded as a session event - and pushes each decoded block, JPEG-encoded, into a :class:`BlockQueue`.

The queue is bounded and *latest wins*: when the client falls behind, the oldest whole block is dropped (a
block is never cut in half) and counted, so a live view stays live instead of drifting further behind.
In lossless mode (while recording) the model thread waits for room instead of dropping.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..interactive import Session
from ..pipeline import StreamingPipeline
from ..video_io import pixels_to_uint8, upscale_nearest

log = logging.getLogger(__name__)


@dataclass
class EncodedBlock:
    """One block as it goes over the wire: JPEG per frame, and the uint8 frames for a recording."""

    epoch: int
    block: int
    jpegs: list[bytes]
    frames: np.ndarray  # uint8 [n, H, W, 3]


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 ``[H, W, 3]`` -> JPEG bytes (Pillow)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class BlockQueue:
    """Bounded, thread-safe, latest-wins queue of whole blocks; ``drops`` counts the blocks dropped."""

    def __init__(self, maxsize: int = 2):
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1 block, got {maxsize}")
        self.maxsize = maxsize
        self.drops = 0
        self.lossless = False
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item) -> None:
        """Add a block; when full, drop the oldest (counted) or, in lossless mode, wait for room."""
        with self._cond:
            while self.lossless and len(self._items) >= self.maxsize and not self._closed:
                self._cond.wait(0.05)
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.drops += 1
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float | None = None):
        """The oldest block, or None if none arrives within ``timeout`` seconds."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def set_lossless(self, on: bool) -> None:
        with self._cond:
            self.lossless = on
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Stats:
    """What the status line shows (updated by the model thread after every block)."""

    generation_fps: float = 0.0  # frames generated per second of model time (moving average)
    block_ms: float = 0.0  # time of the last block: denoise + decode + JPEG
    blocks: int = 0
    frames: int = 0
    paused: bool = False
    history: deque = field(default_factory=lambda: deque(maxlen=8))  # (frames, seconds) of the last blocks


class ModelWorker(threading.Thread):
    """Owns the :class:`Session`; runs blocks, applies commands between them; see the module docstring.

    Commands (posted with :meth:`post`): ``("event", event)`` with a session event (``SetPrompt``, ``SetSeed``,
    ``Reset``, ``SetSinkAlpha``: the same objects a timeline holds), ``("pause",)``, ``("resume",)``. Messages for the client (applied events, errors) go to ``messages``.
    """

    def __init__(self, pipe: StreamingPipeline, prompt: str, *, seed: int, height: int, width: int,
                 blocks: BlockQueue, image: torch.Tensor | None = None, jpeg_quality: int = 90,
                 display_scale: int = 1, decoder_model=None):
        super().__init__(name="model", daemon=True)
        self.pipe, self.prompt, self.seed, self.height, self.width = pipe, prompt, seed, height, width
        self.image = image
        self.decoder_model = decoder_model  # None: the Wan VAE
        self.blocks = blocks
        self.jpeg_quality = jpeg_quality
        self.display_scale = display_scale
        self.commands: queue.Queue = queue.Queue()
        self.messages: deque = deque()  # JSON-able dicts for the client, in order (deque appends are atomic)
        self.stats = Stats()
        self.session: Session | None = None
        self._halt = threading.Event()

    def post(self, *command) -> None:
        self.commands.put(command)

    def stop(self) -> None:
        self._halt.set()
        self.blocks.close()

    def run(self) -> None:
        try:
            with torch.inference_mode():
                self.session = Session(self.pipe, self.prompt, seed=self.seed, height=self.height,
                                       width=self.width, image=self.image, decoder_model=self.decoder_model)
                while not self._halt.is_set():
                    self._apply_commands(wait=self.stats.paused)
                    if not self.stats.paused and not self._halt.is_set():
                        self._generate_one()
        except Exception as err:  # the client learns why the stream stopped; the server keeps running
            log.exception("model thread stopped")
            self.messages.append({"type": "error", "message": f"generation stopped: {err}", "fatal": True})

    def _apply_commands(self, wait: bool) -> None:
        try:
            command = self.commands.get(timeout=0.05) if wait else self.commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            name, *args = command
            try:
                if name == "event":  # a session event (interactive/events.py), applied before the next block
                    (event,) = args
                    self.session.add_event(dataclasses.replace(event, block=self.session.block))
                elif name in ("pause", "resume"):
                    self.stats.paused = name == "pause"
                    self.messages.append({"type": "paused", "paused": self.stats.paused})
                else:
                    raise ValueError(f"unknown command {name!r}")
            except ValueError as err:
                self.messages.append({"type": "error", "message": str(err)})
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                command = None

    def _generate_one(self) -> None:
        start = time.perf_counter()
        block = self.session.next_block()
        frames = pixels_to_uint8(block.frames[0])  # [n, H, W, 3]
        if not isinstance(frames, np.ndarray):
            frames = frames.numpy()
        frames = upscale_nearest(frames, self.display_scale)
        jpegs = [encode_jpeg(f, self.jpeg_quality) for f in frames]
        seconds = time.perf_counter() - start
        stats = self.stats
        stats.history.append((len(jpegs), seconds))
        stats.generation_fps = sum(n for n, _ in stats.history) / max(1e-9, sum(s for _, s in stats.history))
        stats.block_ms, stats.blocks, stats.frames = 1000 * seconds, stats.blocks + 1, stats.frames + len(jpegs)
        if block.events:
            self.messages.append({"type": "applied", "epoch": block.epoch, "block": block.index,
                                  "events": [describe_event(e) for e in block.events]})
        self.blocks.put(EncodedBlock(block.epoch, block.index, jpegs, frames))


def describe_event(event) -> dict:
    """An applied event as JSON (the start image itself is not echoed back)."""
    out = {"kind": type(event).__name__}
    for key, value in vars(event).items():
        out[key] = "<image>" if isinstance(value, torch.Tensor) else value
    return out
