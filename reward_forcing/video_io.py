"""Video files: float pixels -> uint8 frames, a streaming mp4 writer, safe output names.

The pipeline yields frames block by block; ``Mp4Writer`` appends them as they arrive, so a 30 s video
never has to sit in memory as one tensor, and a run that dies mid-video leaves no truncated mp4
behind (frames go to a hidden temporary file that is renamed on success).

Two reference behaviours are deliberately changed (docs/differences.md): float -> uint8 *rounds*
instead of truncating (truncation darkens every pixel by half a level on average and maps the
exact uint8 -> [-1, 1] -> uint8 round trip off by one), and file names carry the prompt index and
sample number, so long prompts sharing 50 characters, prompts with ``/`` and ``num_samples > 1``
cannot collide or escape the output folder.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .file_io import commit, temp_sibling

__all__ = ["DEFAULT_FPS", "pixels_to_uint8", "upscale_nearest", "Mp4Writer", "read_video", "VideoReadError", "video_filename", "slugify"]

DEFAULT_FPS = 16  # Wan2.1 / Reward Forcing output rate
_SLUG_MAX = 50


def pixels_to_uint8(pixels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Map float pixels in [-1, 1] laid out ``[..., 3, H, W]`` to uint8 ``[..., H, W, 3]``.

    Value: ``floor((x + 1) * 127.5 + 0.5)`` clamped to 0..255, i.e. round half up, so -1 -> 0,
    0 -> 128, 1 -> 255, and ``k / 127.5 - 1`` -> k for every uint8 k. NaN becomes 128 (mid grey)
    rather than an undefined cast. Returns the input's kind (torch tensor or numpy array).
    """
    is_numpy = isinstance(pixels, np.ndarray)
    x = torch.from_numpy(pixels) if is_numpy else pixels
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pixels must be a torch.Tensor or numpy array, got {type(pixels).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"pixels must be floating point in [-1, 1], got dtype {x.dtype}; uint8 frames "
                        f"need no conversion")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"pixels must be laid out [..., 3, H, W], got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    x = torch.nan_to_num(x, nan=0.0)
    out = torch.floor((x + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)
    out = out.movedim(-3, -1).contiguous()
    return out.numpy() if is_numpy else out


def upscale_nearest(frames: np.ndarray, scale: int) -> np.ndarray:
    """Enlarge uint8 frames ``[..., H, W, 3]`` ``scale`` times by repeating pixels (``video.display_scale``)."""
    if scale == 1:
        return frames
    return np.ascontiguousarray(frames.repeat(scale, axis=-3).repeat(scale, axis=-2))


def _as_uint8_frames(frames) -> np.ndarray:
    """Accept uint8 ``[N, H, W, 3]`` / ``[H, W, 3]`` or float ``[N, 3, H, W]`` / ``[3, H, W]``."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.detach().cpu().numpy()
        else:
            frames = pixels_to_uint8(frames).numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            if not np.issubdtype(frames.dtype, np.floating):
                raise TypeError(f"frames must be uint8 or float, got dtype {frames.dtype}")
            frames = pixels_to_uint8(frames)
    else:
        raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, H, W, 3] or float [N, 3, H, W]; got uint8 shape "
                         f"{tuple(frames.shape)} after conversion")
    return np.ascontiguousarray(frames)


class Mp4Writer:
    """Append frames to an H.264 mp4 as they stream; the file appears only when complete.

    >>> with Mp4Writer("out/0000-a-cat-s0.mp4") as w:
    ...     for chunk in pipe.stream(prompt):   # float [N, 3, H, W] in [-1, 1]
    ...         w.write(chunk)

    Frames go to a hidden temporary file in the destination folder, renamed to ``path`` by
    ``close()``; leaving the ``with`` block through an exception (or calling ``abort()``) deletes it.
    If ffmpeg fails (a full disk, a missing encoder), ``write`` or ``close`` raise ``OSError`` with
    ffmpeg's own message and ``path`` is left untouched: imageio's ffmpeg writer does not check
    ffmpeg's exit status, so this class runs the ffmpeg binary of imageio-ffmpeg itself.
    Pixel format is yuv420p (plays everywhere) when height and width are even, else yuv444p, which
    keeps odd sizes exact instead of letting the encoder fail or rescale. ``crf`` is x264's quality
    (lower = better, 18 is visually lossless). ``scale`` enlarges every frame by repeating pixels.
    """

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, *, codec: str = "libx264",
                 crf: int = 18, scale: int = 1):
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.path = Path(path)
        self.scale = scale
        self.fps = fps
        self.codec = codec
        self.crf = crf
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._ffmpeg: subprocess.Popen | None = None
        self._log = None  # ffmpeg's stderr, read back when it fails
        self._tmp: Path | None = None
        self._closed = False

    def _open(self, height: int, width: int) -> None:
        with _interrupts_deferred():
            self._start_ffmpeg(height, width)

    def _start_ffmpeg(self, height: int, width: int) -> None:
        from imageio_ffmpeg import get_ffmpeg_exe

        self._tmp = temp_sibling(self.path, suffix=".mp4")  # ffmpeg picks the muxer from the extension
        pixfmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        cmd = [get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
               "-pix_fmt", "rgb24", "-r", str(Fraction(self.fps).limit_denominator()), "-i", "-", "-an",
               "-vcodec", self.codec, "-pix_fmt", pixfmt, "-v", "error", "-crf", str(self.crf), str(self._tmp)]
        self._log = tempfile.TemporaryFile()
        # A session of its own: Ctrl-C in a terminal reaches only Python, which decides what happens to the file.
        self._ffmpeg = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                        start_new_session=True)
        self._size = (height, width)

    def write(self, frames) -> None:
        """Append frames: uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]`` in [-1, 1] (N may be absent)."""
        if self._closed:
            raise RuntimeError(f"Mp4Writer for '{self.path}' is already closed")
        frames = upscale_nearest(_as_uint8_frames(frames), self.scale)
        h, w = frames.shape[1:3]
        try:
            if self._ffmpeg is None:
                self._open(h, w)
            elif (h, w) != self._size:
                raise ValueError(f"frame size changed from {self._size[0]}x{self._size[1]} to {h}x{w} "
                                 f"while writing '{self.path}'")
            self._ffmpeg.stdin.write(memoryview(frames))
        except BrokenPipeError:  # ffmpeg quit early; its exit status and message say why
            self._ffmpeg.kill()
            self._ffmpeg.wait()
            self._fail("while writing")
        except BaseException:
            self.abort()
            raise
        self.frames_written += len(frames)

    def close(self) -> Path:
        """Finish the file and move it to ``path``. Writing no frame at all is an error."""
        if self._closed:
            return self.path
        if self._ffmpeg is None:
            self._closed = True
            raise ValueError(f"no frames were written to '{self.path}'; nothing saved")
        try:
            try:
                self._ffmpeg.stdin.close()
                broken = False
            except BrokenPipeError:  # ffmpeg quit before taking every frame; its exit status and message say why
                broken = True
            if self._ffmpeg.wait() != 0 or broken:
                self._fail("while finishing")
            commit(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._release()
        return self.path

    def _fail(self, when: str):
        """Raise OSError with ffmpeg's own reason (e.g. "No space left on device"); the caller aborts."""
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        # "[out#0/mp4 @ 0x55d...] Error ...: No space left on device" -> "Error ...: No space left on device"
        reason = re.sub(r"^\[[^]]*\]\s*", "", lines[0]) if lines else "no message"
        self.abort()
        raise OSError(f"could not write '{self.path}': ffmpeg failed {when} the video (exit status "
                      f"{self._ffmpeg.returncode}): {reason}; nothing was saved under that name")

    def abort(self) -> None:
        """Stop writing and delete the temporary file; ``path`` is left untouched."""
        self._closed = True
        if self._ffmpeg is not None and self._ffmpeg.poll() is None:
            self._ffmpeg.kill()
            self._ffmpeg.wait()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._ffmpeg is not None:
            try:
                self._ffmpeg.stdin.close()
            except OSError:  # unflushed frames for a process that is gone
                pass
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


@contextmanager
def _interrupts_deferred():
    """Hold SIGINT / SIGTERM while the temporary file is created and ffmpeg started. An interrupt in between would
    leave a file (or an orphaned ffmpeg writing one) that ``abort`` does not know of yet; held, the signal is
    delivered right after, when ``abort`` can clean up.

    Held by a recording handler, not by a signal mask: the kernel hands a process-directed signal to any thread
    that does not block it (torch's or tqdm's threads), and Python then runs the handler in the main thread at
    once, mask or not. ffmpeg does not inherit the handler (exec resets it); it is only ever stopped with SIGKILL
    or by the end of its input."""
    if threading.current_thread() is not threading.main_thread():  # handlers are set (and run) in the main thread
        yield
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in held:  # delivered now, to the handler the caller had
            signal.raise_signal(signum)


class VideoReadError(ValueError):
    """A video file that cannot be read; ``str()`` is one line naming the file and the reason."""


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A whole video file as uint8 RGB frames ``[N, H, W, 3]`` and its frame rate: the one checked reader (start
    videos, the evaluation kit, tests). Anything unreadable - missing, empty, undecodable, frameless, no frame
    rate - raises :class:`VideoReadError` with one line naming the file."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video '{path}' does not exist")
    if path.stat().st_size == 0:
        raise VideoReadError(f"video '{path}' is empty (0 bytes)")
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            fps = reader.get_meta_data().get("fps")
            frames = np.stack([np.asarray(f) for f in reader])
        finally:
            reader.close()
    except Exception as err:  # imageio / ffmpeg raise OSError, RuntimeError, IndexError, ... for a bad file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise VideoReadError(f"video '{path}' could not be decoded: {lines[-1] if lines else type(err).__name__}"
                             ) from None
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise VideoReadError(f"video '{path}' has no frames")
    if not fps or not np.isfinite(fps) or fps <= 0:
        raise VideoReadError(f"video '{path}' has no usable frame rate ({fps!r})")
    return frames, float(fps)


def slugify(text: str, max_len: int = _SLUG_MAX) -> str:
    """Lowercase ASCII ``[a-z0-9-]`` version of ``text`` (accents folded), at most ``max_len`` chars."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "prompt"


def video_filename(index: int, prompt: str, sample: int = 0) -> str:
    """``"{index:04d}-{slug}-s{sample}.mp4"``: unique per (prompt line, sample), safe on any file system.

    ``index`` is the prompt's line number in its file, which makes names unique even when prompts
    share their first words; the slug only helps humans find a video.
    """
    if index < 0 or sample < 0:
        raise ValueError(f"index and sample must be >= 0, got index={index}, sample={sample}")
    return f"{index:04d}-{slugify(prompt)}-s{sample}.mp4"
