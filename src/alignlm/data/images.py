"""Image loading and preprocessing: pad to square with the mean colour (LLaVA-1.5), resize, normalise.

``ImageSpec`` lives here, on the data side: a vision tower declares the spec it expects, and everything that turns
files into pixels (the dataset, the probes, the encoders) prepares images from it, so no reader ever guesses.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignlm.data.records import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE, DataError

MAX_PIXELS = 50_000_000  # data.max_image_pixels default: ~7000 x 7000, far above any training image's need


@dataclass(frozen=True)
class ImageSpec:
    """How images must be prepared for a tower: square size and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_rgb(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open an image fully (so a truncated file fails here, not later) and convert it to RGB.

    The size is read from the header and checked against ``max_pixels`` before anything is decoded, so a
    decompression bomb (a few hundred kilobytes that expand to gigabytes) costs nothing; the check is on the square
    the image is padded to (``pad_to_square``), so a 1 x 1,000,000 strip is as large as it becomes. Only a regular
    file is opened (a FIFO or a device would block the reader). 16-bit grey images are scaled to 8 bits (convert()
    clips them); 32-bit integer or float pixels, whose range nothing states, are refused. Failures are ``DataError`` s
    counted by cause: missing file, image too large, unreadable file.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"cannot read image {path}: not a regular file", UNREADABLE_IMAGE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the one that applies
            im = Image.open(path)
    except FileNotFoundError as e:
        raise DataError(f"image {path} does not exist", MISSING_IMAGE) from e
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path}: {e}", IMAGE_TOO_LARGE) from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}", UNREADABLE_IMAGE) from e
    with im:
        width, height = im.size
        if max_pixels and max(width, height) ** 2 > max_pixels:
            raise DataError(
                f"image {path} has {width}x{height} pixels, padded to a square {max(width, height) ** 2}, over "
                f"data.max_image_pixels={max_pixels}",
                IMAGE_TOO_LARGE,
            )
        try:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("RGB") clips at 255 (mid-grey became white)
                grey = np.asarray(im).astype(np.uint32)
                return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
            if im.mode in ("I", "F"):  # 32-bit integer or float pixels: no range that says what is white
                raise DataError(
                    f"cannot read image {path}: its {im.mode!r} pixels (32-bit {'integers' if im.mode == 'I' else 'floats'}) "
                    "have no fixed range to map to 8 bits (Pillow would clip them to black or white); save it as an 8 or "
                    "16-bit image",
                    UNREADABLE_IMAGE,
                )
            return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path}: {e}", UNREADABLE_IMAGE) from e


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas so resizing keeps the aspect ratio."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(image: Image.Image, spec: ImageSpec, pad: bool = True) -> torch.Tensor:
    """PIL image -> normalised ``[3, size, size]`` float tensor as the tower expects."""
    if pad:
        image = pad_to_square(image, tuple(int(m * 255) for m in spec.mean))  # truncated, as LLaVA and transformers do
    image = image.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x - mean) / std
