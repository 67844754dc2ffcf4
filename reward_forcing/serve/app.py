"""The web app: a static page and one WebSocket that streams a live session to the browser.

Wire protocol (``/ws``)
-----------------------
Server -> client, binary: one message per frame, a 16-byte little-endian header ``(epoch, block, frame,
frames_in_block)`` (uint32 each) then the JPEG. ``block`` counts blocks over the whole session (the clock
events are stamped with), ``frame`` is the frame's index inside its block.
Server -> client, text (JSON): ``hello`` (video size, fps, policies, limits, the first prompt), ``status`` (generation fps,
block latency, queue depth, drops), ``applied`` (events that took effect, with their block), ``paused``,
``recording`` (the download URL and frame count of a finished recording), ``error`` (bad message: the
connection stays up) and ``busy`` (another client is generating; the connection is closed).
Client -> server, text (JSON, one ``type`` each): ``start {prompt, seed}``, ``prompt {text, policy, blend}``,
``seed {seed}``, ``reset {prompt?, seed?}``, ``sink_alpha {alpha}``, ``pause``, ``resume``,
``record {on}``, ``ack {block}``. Client -> server, binary: an image (PNG/JPEG/WEBP/BMP) to restart from.

Flow control: at most ``in_flight`` blocks are sent and not yet acknowledged (the page acknowledges a block
when it starts playing it); the rest wait in the model thread's latest-wins :class:`~.stream.BlockQueue`,
which drops whole blocks when the client falls behind. While recording, the queue is lossless and the
recording (an mp4 written by the server under a name it generates) holds exactly the frames sent.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..interactive import SWITCH_POLICIES, Reset, fit_frames, read_image
from ..interactive.events import event_from_dict
from ..pipeline import StreamingPipeline
from ..video_io import DEFAULT_FPS, Mp4Writer
from .stream import BlockQueue, ModelWorker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HEADER_BYTES = 16
_MESSAGE_TYPES = {"start", "prompt", "seed", "reset", "sink_alpha", "pause", "resume", "record", "ack"}
# Messages that are session events: timeline key -> message field (interactive/events.py decodes both)
_EVENT_MESSAGES = {"prompt": {"prompt": "text", "policy": "policy", "blend": "blend"}, "seed": {"seed": "seed"},
                   "reset": {"prompt": "prompt", "seed": "seed"}, "sink_alpha": {"sink_alpha": "alpha"}}
_RELOAD_GRACE_S = 1.0  # how long a new client waits for the old one's close to arrive (a reload: milliseconds)
_RECORDING_NAME = re.compile(r"^recording-\d{8}-\d{6}-[0-9a-f]{8}\.mp4$")


@dataclass
class ServeOptions:
    """Limits and knobs of the app (the CLI's flags)."""

    height: int
    width: int
    fps: float = DEFAULT_FPS
    display_scale: int = 1  # frames are enlarged this many times (nearest neighbour) before JPEG encoding
    token: str | None = None  # required as ?token=... on every request when set
    record_dir: Path = Path("recordings")
    max_prompt_chars: int = 1000
    start_prompt: str = ""  # the page's first prompt ('': its own sample scene)
    max_upload_bytes: int = 8 * 2**20
    queue_blocks: int = 2  # blocks the server holds before dropping the oldest
    in_flight: int = 2  # blocks sent and not yet acknowledged
    jpeg_quality: int = 90
    decoder_model: object | None = None  # a fast preview decoder (TAEHVDecoder); None: the Wan VAE
    # A page reload: the old connection winds down (its model thread stops after the block in hand) while the new
    # one waits up to this long for it, instead of being told it is busy.
    handover_s: float = 30.0


class ClientError(ValueError):
    """A malformed or out-of-limits message: answered with an error event, the connection stays up."""


def create_app(pipe: StreamingPipeline, options: ServeOptions) -> FastAPI:
    """The FastAPI app over ``pipe``. One generating session per process: a second client is told it is busy,
    unless the first has already gone (a page reload), in which case it is served once the first has wound down."""
    app = FastAPI(title="reward-forcing live", docs_url=None, redoc_url=None, openapi_url=None)
    state: dict[str, Connection | None] = {"connection": None}

    async def slot_free() -> bool:
        """Wait for the current connection to finish if its client has left (within ``handover_s``); a client
        still connected after a short grace keeps the slot."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (current := state["connection"]) is not None:
            waited = loop.time() - start
            if waited > options.handover_s or (not current.closed and waited > _RELOAD_GRACE_S):
                return False
            await asyncio.sleep(0.02)
        return True

    def authorised(token: str | None) -> bool:
        return options.token is None or (token is not None and hmac.compare_digest(token, options.token))

    @app.get("/")
    async def index(token: str | None = None):
        if not authorised(token):
            return JSONResponse({"error": "a valid ?token= is required"}, status_code=403)
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/recordings/{name}")
    async def recording(name: str, token: str | None = None):
        if not authorised(token):
            return JSONResponse({"error": "a valid ?token= is required"}, status_code=403)
        path = options.record_dir / name
        if not _RECORDING_NAME.match(name) or not path.is_file():
            return JSONResponse({"error": "no such recording"}, status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=name)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.websocket("/ws")
    async def stream(ws: WebSocket):
        await ws.accept()
        if not authorised(ws.query_params.get("token")):
            await ws.send_text(json.dumps({"type": "error", "message": "a valid ?token= is required", "fatal": True}))
            await ws.close(code=1008)
            return
        if not await slot_free():
            await ws.send_text(json.dumps({"type": "busy", "message": "busy: another client is generating on "
                                           "this server (one session per process); try again when it closes"}))
            await ws.close(code=1013)
            return
        state["connection"] = connection = Connection(ws, pipe, options)
        try:
            await connection.run()
        finally:
            state["connection"] = None

    return app


class Connection:
    """One client: a receive loop (commands) and a send loop (frames and messages) around a model thread."""

    def __init__(self, ws: WebSocket, pipe: StreamingPipeline, options: ServeOptions):
        self.ws, self.pipe, self.options = ws, pipe, options
        self.queue = BlockQueue(options.queue_blocks)
        self.worker: ModelWorker | None = None
        self.in_flight = 0
        self.sent_blocks = 0
        self.recorder: Mp4Writer | None = None
        self.record_path: Path | None = None
        self.recorded_frames = 0
        self.closed = False

    async def run(self) -> None:
        scale = self.options.display_scale
        await self.send_json({"type": "hello", "fps": self.options.fps, "height": self.options.height * scale,
                              "width": self.options.width * scale, "policies": list(SWITCH_POLICIES),
                              "max_prompt_chars": self.options.max_prompt_chars, "start_prompt": self.options.start_prompt,
                              "max_upload_bytes": self.options.max_upload_bytes})
        sender = asyncio.create_task(self.send_loop())
        try:
            await self.receive_loop()
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            if self.worker is not None:  # a closed tab stops generation
                self.worker.stop()
                await asyncio.to_thread(self.worker.join, 30)
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass
            if self.recorder is not None:
                await asyncio.to_thread(self.recorder.abort)

    async def send_json(self, message: dict) -> None:
        await self.ws.send_text(json.dumps(message))

    # ------------------------------------------------------------------------------------------- receive
    async def receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            try:
                if message.get("bytes") is not None:
                    await self.on_image(message["bytes"])
                else:
                    await self.on_command(message.get("text") or "")
            except ClientError as err:
                await self.send_json({"type": "error", "message": str(err)})
            except WebSocketDisconnect:
                raise
            except Exception as err:  # a bug here must not take the stream down with it: report, keep serving
                log.exception("error handling a client message")
                await self.send_json({"type": "error", "message": f"server error: {type(err).__name__}"})

    async def on_command(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            raise ClientError(f"not JSON: {text[:60]!r}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ClientError("a message is a JSON object with a 'type'")
        kind = msg["type"]
        if kind not in _MESSAGE_TYPES:
            raise ClientError(f"unknown message type {kind!r}; one of {sorted(_MESSAGE_TYPES)}")
        if kind == "ack":
            self.in_flight = max(0, self.in_flight - 1)
            return
        if kind == "start":
            if self.worker is not None:
                raise ClientError("already started: use 'prompt' or 'reset'")
            self.start(self._prompt(msg.get("prompt")), self._seed(msg.get("seed", 0)))
            return
        if kind == "record":
            await self.record(bool(msg.get("on")))
            return
        if self.worker is None:
            raise ClientError(f"send 'start' before {kind!r}")
        if kind in _EVENT_MESSAGES:  # the same decoding as a timeline entry; applied before the next block
            entry = {key: msg[field] for key, field in _EVENT_MESSAGES[kind].items() if msg.get(field) is not None}
            if kind == "reset":  # an empty prompt keeps the one in effect
                entry = {"reset": True, **{k: v for k, v in entry.items() if k != "prompt" or v}}
            if "prompt" in entry:
                entry["prompt"] = self._prompt(entry["prompt"])
            try:
                event = event_from_dict({"block": 0, **entry})
            except ValueError as err:
                raise ClientError(str(err)) from None
            self.worker.post("event", event)
        else:  # pause, resume
            self.worker.post(kind)

    def _prompt(self, text) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ClientError("the prompt must be a non-empty string")
        if len(text) > self.options.max_prompt_chars:
            raise ClientError(f"the prompt has {len(text)} characters; the limit is {self.options.max_prompt_chars}")
        return text.strip()

    @staticmethod
    def _seed(seed) -> int:
        try:
            return event_from_dict({"block": 0, "seed": seed}).seed
        except ValueError as err:
            raise ClientError(str(err)) from None

    async def on_image(self, data: bytes) -> None:
        if len(data) > self.options.max_upload_bytes:
            raise ClientError(f"the image has {len(data)} bytes; the limit is {self.options.max_upload_bytes}")
        try:
            pixels, note = fit_frames(read_image(data)[None], self.options.height, self.options.width)
        except ValueError as err:
            raise ClientError(str(err)) from None
        if note:
            await self.send_json({"type": "notice", "message": f"start image {note}"})
        if self.worker is None:
            self.start(None, 0, image=pixels[0])
        else:
            self.worker.post("event", Reset(0, image=pixels[0]))

    def start(self, prompt: str | None, seed: int, image=None) -> None:
        self.worker = ModelWorker(self.pipe, prompt or "a video", seed=seed, height=self.options.height,
                                  width=self.options.width, blocks=self.queue, image=image,
                                  jpeg_quality=self.options.jpeg_quality, display_scale=self.options.display_scale,
                                  decoder_model=self.options.decoder_model)
        self.worker.start()

    # ------------------------------------------------------------------------------------------- record
    async def record(self, on: bool) -> None:
        if on and self.recorder is None:
            self.options.record_dir.mkdir(parents=True, exist_ok=True)
            name = f"recording-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.mp4"  # never the client's
            self.record_path = self.options.record_dir / name
            self.recorder = Mp4Writer(self.record_path, fps=self.options.fps)
            self.recorded_frames = 0
            self.queue.set_lossless(True)
            await self.send_json({"type": "recording", "on": True})
        elif not on and self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            self.queue.set_lossless(False)
            if self.recorded_frames:
                await asyncio.to_thread(recorder.close)
                await self.send_json({"type": "recording", "on": False, "frames": self.recorded_frames,
                                      "url": f"/recordings/{self.record_path.name}"})
            else:
                await asyncio.to_thread(recorder.abort)
                await self.send_json({"type": "recording", "on": False, "frames": 0})

    # ------------------------------------------------------------------------------------------- send
    async def send_loop(self) -> None:
        last_status = 0.0
        while not self.closed:
            worker = self.worker
            if worker is None:
                await asyncio.sleep(0.02)
                continue
            while worker.messages:
                await self.send_json(worker.messages.popleft())
            now = time.monotonic()
            if now - last_status > 0.25:
                last_status = now
                stats = worker.stats
                await self.send_json({"type": "status", "generation_fps": round(stats.generation_fps, 2),
                                      "block_ms": round(stats.block_ms, 1), "queue": len(self.queue),
                                      "drops": self.queue.drops, "blocks": stats.blocks, "paused": stats.paused,
                                      "in_flight": self.in_flight})
            if self.in_flight >= self.options.in_flight:
                await asyncio.sleep(0.01)
                continue
            block = await asyncio.to_thread(self.queue.get, 0.05)
            if block is None:
                continue
            n = len(block.jpegs)
            for i, jpeg in enumerate(block.jpegs):
                await self.ws.send_bytes(_header(block.epoch, block.block, i, n) + jpeg)
            self.in_flight += 1
            self.sent_blocks += 1
            if self.recorder is not None:
                await asyncio.to_thread(self.recorder.write, block.frames)
                self.recorded_frames += n


def _header(epoch: int, block: int, frame: int, frames: int) -> bytes:
    return epoch.to_bytes(4, "little") + block.to_bytes(4, "little") + frame.to_bytes(4, "little") + \
        frames.to_bytes(4, "little")
