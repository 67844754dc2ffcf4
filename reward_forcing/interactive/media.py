"""Start media: read an image or a video and fit it to the stream's size.

Frames of the wrong size are scaled (aspect ratio kept) until they cover ``height x width``, then the overflow
is cropped evenly from both sides (center crop); the returned note says what was done so the caller can
tell the user. Unreadable files raise ``ValueError`` with one line naming the file.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_TYPES = ("PNG", "JPEG", "WEBP", "BMP")  # Pillow formats accepted from uploads
MAX_IMAGE_PIXELS = 8192 * 8192  # a small compressed file can declare a huge image: refuse before decoding


def fit_frames(frames: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, str | None]:
    """uint8 ``[N, H, W, 3]`` -> pixels ``[N, 3, height, width]`` in [-1, 1], and a note if they were resized
    or cropped (None when they already had the size)."""
    x = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # a writable copy
    src_h, src_w = x.shape[-2:]
    note = None
    if (src_h, src_w) != (height, width):
        scale = max(height / src_h, width / src_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
        if (new_h, new_w) != (src_h, src_w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[..., top:top + height, left:left + width]
        if (new_h, new_w) == (src_h, src_w):
            note = f"center-cropped {src_w}x{src_h} to {width}x{height}"
        elif (new_h, new_w) == (height, width):
            note = f"resized {src_w}x{src_h} to {width}x{height}"
        else:
            note = f"resized {src_w}x{src_h} to {new_w}x{new_h} and center-cropped to {width}x{height}"
    return (x.clamp(0, 255) / 127.5 - 1.0).contiguous(), note


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """An image file (or its bytes) as uint8 ``[H, W, 3]``; ``ValueError`` if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    name = "the uploaded image" if isinstance(source, bytes) else f"image '{source}'"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as img:
            if img.format not in IMAGE_TYPES:
                raise ValueError(f"{name} is {img.format or 'of an unknown type'}; use one of {', '.join(IMAGE_TYPES)}")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{name} is {img.width}x{img.height}; the limit is {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise ValueError(f"{name} does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise ValueError(f"{name} is not a readable image ({type(err).__name__})") from None


