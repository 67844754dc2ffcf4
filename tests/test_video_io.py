"""Frame conversion, streaming mp4 writing and output names (reward_forcing.video_io)."""
import os

import numpy as np
import pytest
import torch

from reward_forcing import file_io, video_io
from reward_forcing.video_io import Mp4Writer, pixels_to_uint8, read_video, slugify, video_filename


# -------------------------------------------------------------------------------------- conversion
def test_pixels_to_uint8_values_round_half_up():
    x = torch.tensor([-1.0, 1.0, 0.0, -1.5, 1.5, 0.5, -0.5]).view(7, 1, 1, 1).expand(7, 3, 1, 1)
    out = pixels_to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (7, 1, 1, 3)
    # 0 -> 127.5 exactly -> 128 (half up); 0.5 -> 191.25 -> 191; -0.5 -> 63.75 -> 64; clamped ends.
    assert out[:, 0, 0, 0].tolist() == [0, 255, 128, 0, 255, 191, 64]


def test_pixels_to_uint8_inverts_uint8_to_pixels_exactly():
    # The reference truncates, which maps most k back to k - 1; rounding must give k for every level.
    k = torch.arange(256, dtype=torch.float32)
    x = (k / 127.5 - 1.0).view(1, 1, 256).expand(3, 1, 256)
    assert pixels_to_uint8(x)[0, :, 0].tolist() == list(range(256))
    assert pixels_to_uint8(x.to(torch.bfloat16)).dtype == torch.uint8


def test_pixels_to_uint8_layout_numpy_and_nan():
    x = torch.zeros(2, 4, 3, 5, 7)
    x[..., 0, :, :] = 1.0  # red channel
    x[0, 0, 2, 0, 0] = float("nan")
    out = pixels_to_uint8(x)
    assert out.shape == (2, 4, 5, 7, 3)
    assert (out[..., 0] == 255).all() and (out[1, ..., 1] == 128).all()
    assert out[0, 0, 0, 0, 2] == 128  # NaN -> mid grey
    np_out = pixels_to_uint8(x.numpy())
    assert isinstance(np_out, np.ndarray) and np.array_equal(np_out, out.numpy())


def test_pixels_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        pixels_to_uint8(torch.zeros(2, 8, 8, 3))
    with pytest.raises(TypeError, match="uint8"):
        pixels_to_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- mp4
def _gradient_frames(n, h, w, offset=0):
    """Smooth, distinct frames (codec-friendly) as float [n, 3, h, w] in [-1, 1]."""
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + offset
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    c = torch.tensor([0.6, 0.0, -0.6]).view(1, 3, 1, 1)
    return (0.5 * torch.sin(ys * 2 + xs + t * 0.3) + 0.3 * c).clamp(-1, 1)


def test_stream_two_writes_read_back(tmp_path):
    path = tmp_path / "out" / "0000-a-cat-s0.mp4"
    first = _gradient_frames(9, 48, 80)
    second = pixels_to_uint8(_gradient_frames(12, 48, 80, offset=9))  # uint8 [N, H, W, 3] also accepted
    with Mp4Writer(path) as w:
        w.write(first)
        assert not path.exists()  # nothing visible at the final name until close
        w.write(second)
    assert w.frames_written == 21
    frames, fps = read_video(path)
    assert frames.shape == (21, 48, 80, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(16.0)
    # Lossy codec, but the content must survive (mean abs error of a few levels).
    expected = np.concatenate([pixels_to_uint8(first).numpy(), second.numpy()])
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 6
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_scale_enlarges_nearest_neighbour(tmp_path):
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[:, 0, 1] = [255, 0, 0]  # one red pixel top right
    assert video_io.upscale_nearest(frames, 1) is frames
    big = video_io.upscale_nearest(frames, 4)
    assert big.shape == (3, 8, 8, 3) and (big[:, :4, 4:] == [255, 0, 0]).all() and (big[:, 4:] == 0).all()
    with Mp4Writer(tmp_path / "s.mp4", fps=8, scale=16) as w:
        w.write(frames)
    video, _ = read_video(tmp_path / "s.mp4")
    assert video.shape == (3, 32, 32, 3)
    assert video[:, 4:12, 20:28, 0].min() > 200 and video[:, 20:, :, 0].max() < 40
    with pytest.raises(ValueError, match="scale must be >= 1"):
        Mp4Writer(tmp_path / "x.mp4", scale=0)


def test_odd_size_is_kept(tmp_path):
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, fps=8) as w:
        w.write(_gradient_frames(3, 33, 51)[0])  # a single float frame [3, H, W]
        w.write(_gradient_frames(2, 33, 51))
    frames, fps = read_video(path)
    assert frames.shape == (3, 33, 51, 3) and fps == pytest.approx(8.0)


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path) as w:
            w.write(_gradient_frames(4, 16, 16))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_size_change_and_empty_video_are_errors(tmp_path):
    path = tmp_path / "x.mp4"
    with pytest.raises(ValueError, match="frame size changed"):
        with Mp4Writer(path) as w:
            w.write(_gradient_frames(2, 16, 16))
            w.write(_gradient_frames(2, 16, 32))
    with pytest.raises(ValueError, match="no frames"):
        with Mp4Writer(path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_on_success(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with Mp4Writer(path) as w:
            w.write(_gradient_frames(2, 16, 16))
            raise RuntimeError("stop")
    assert path.read_bytes() == b"old"
    with Mp4Writer(path) as w:
        w.write(_gradient_frames(2, 16, 16))
    assert read_video(path)[0].shape[0] == 2


@pytest.fixture
def full_disk(monkeypatch):
    """Make every Mp4Writer write to /dev/full, where each write fails with ENOSPC as on a full disk."""
    if not os.path.exists("/dev/full"):  # Linux provides it (CI too); other systems have no such device
        pytest.skip("needs /dev/full (Linux) to simulate a full disk")

    def temp_on_full_disk(path, **kwargs):
        tmp = file_io.temp_sibling(path, **kwargs)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(video_io, "temp_sibling", temp_on_full_disk)


def test_full_disk_at_close_is_an_error_and_leaves_nothing(tmp_path, full_disk):
    # A short video fits in ffmpeg's buffers, so ffmpeg only meets the full disk when it finishes the file.
    path = tmp_path / "v.mp4"
    with pytest.raises(OSError, match=r"could not write '.*v\.mp4'.*No space left on device.*nothing was saved"):
        with Mp4Writer(path) as w:
            w.write(_gradient_frames(9, 48, 80))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_streaming_is_an_error_and_leaves_nothing(tmp_path, full_disk):
    # A long video: ffmpeg quits on the full disk mid-stream and the next write finds its pipe closed.
    path = tmp_path / "v.mp4"
    frames = pixels_to_uint8(_gradient_frames(16, 64, 96))
    with pytest.raises(OSError, match="No space left on device"):
        with Mp4Writer(path) as w:
            for _ in range(200):
                w.write(frames)
    assert list(tmp_path.iterdir()) == []


def test_temporary_file_is_a_hidden_sibling_that_leftover_temps_finds(tmp_path):
    path = tmp_path / "0001-x-s0.mp4"
    w = Mp4Writer(path)
    w.write(_gradient_frames(2, 16, 16))
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".0001-x-s0.mp4.tmp-") and tmp.suffix == ".mp4"
    assert file_io.leftover_temps(tmp_path) == {tmp: path.name}  # what a killed run would leave
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- names
def test_video_filename_format():
    assert video_filename(7, "A cat, playing piano!", 0) == "0007-a-cat-playing-piano-s0.mp4"
    assert video_filename(12345, "x", 3) == "12345-x-s3.mp4"


def test_video_filename_is_safe():
    for prompt in ["../../etc/passwd", "a/b\\c:d*e?f\"g<h>i|j", "一只猫在弹钢琴", "", "   ", "\x00\n\t",
                   "Café crème brûlée", "x" * 1000, "word " * 200]:
        name = video_filename(1, prompt, 0)
        stem = name[: -len(".mp4")]
        assert name.endswith(".mp4") and "/" not in name and "\\" not in name
        assert all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in stem)
        assert len(name) <= 4 + 1 + 50 + 3 + 4
        assert "--" not in name
    assert video_filename(0, "一只猫", 0) == "0000-prompt-s0.mp4"
    assert slugify("Café crème") == "cafe-creme"
    assert not slugify("a " * 40).endswith("-")


def test_video_filename_unique_for_shared_prefixes_and_samples():
    long_a = "A very long prompt that shares its first fifty characters with another one, version A"
    long_b = long_a[:-1] + "B"
    names = {video_filename(i, p, s) for i, p in enumerate([long_a, long_b, long_a]) for s in range(2)}
    assert len(names) == 6


def test_video_filename_rejects_negative():
    with pytest.raises(ValueError):
        video_filename(-1, "x", 0)


def test_interrupts_are_held_while_the_temporary_file_is_made_and_delivered_after():
    """A SIGTERM during the creation of the temporary file reaches the caller's handler only after it, whichever
    thread the kernel hands it to (a mask on the main thread alone would not hold it)."""
    import os
    import signal
    import threading

    from reward_forcing.video_io import _interrupts_deferred

    seen, previous = [], signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _interrupts_deferred():
            worker = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            worker.start()
            worker.join()
            for _ in range(1000):  # bytecodes during which Python would run a pending handler
                pass
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
