"""Image loading and preprocessing: a square from any aspect ratio (LLaVA-1.5's two ways: pad with the mean colour, or
resize the shorter side and crop the centre), resize, normalise.

``ImageSpec`` lives here, on the data side: a vision tower declares the spec it expects, and everything that turns
files into pixels (the dataset, the probes, the encoders) prepares images from it, so no reader ever guesses.
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from alignlm.config import ConfigError
from alignlm.data.records import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE, DataError

MAX_PIXELS = 50_000_000  # data.max_image_pixels default: ~7000 x 7000, far above any training image's need

# data.image_aspect_ratio: how an image that is not square becomes the tower's square. LLaVA-1.5 does both:
# finetune.sh passes --image_aspect_ratio pad (expand2square with the mean colour, then the processor), pretrain.sh
# leaves its default 'square', the image processor alone (shorter side resized, centre cropped).
ASPECT_RATIOS = ("pad", "crop")


@dataclass(frozen=True)
class ImageSpec:
    """How images must be prepared for a tower: square size and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ImageReading:
    """How a stage reads its images (its ``data`` node): made square as ``aspect_ratio`` says (``pad`` | ``crop``), one
    over ``max_pixels`` refused undecoded (``data.max_image_pixels``; None: no limit). What reads images for a
    checkpoint besides its training (the probes, token-word accuracy, V2L's words) reads them as its stage did: with
    the default limit, a probe refused the large images a stage that lifted it trained on."""

    aspect_ratio: str = "pad"
    max_pixels: int | None = MAX_PIXELS


PADDED = ImageReading()  # the defaults: a checkpoint from before either setting padded its images


_PILLOW_LIMIT = threading.Lock()  # Pillow's limit is one global: one read at a time sets and restores it


@contextmanager
def _pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's own decompression-bomb limit set to ``max_pixels`` (None: none) for one step of a read, and restored
    after. Pillow refuses an image over twice its ``Image.MAX_IMAGE_PIXELS`` (~179 M pixels by default) whatever
    ``data.max_image_pixels`` says, so a setting of null (no limit) or above Pillow's refused such images all the
    same; its warnings are silenced (the setting is the limit that applies)."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels or None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


# The raster formats a LLaVA-style dataset holds: COCO, GQA, TextVQA, Visual Genome and ShareGPT4V are JPEG (a
# camera's multi-picture JPEG, MPO, is read as JPEG), OCR-VQA adds GIF and PNG, web-crawled sets WEBP, BMP and TIFF.
# Pillow would otherwise try every format it knows, EPS among them, which it renders by running Ghostscript, an
# external program, on the file: a PostScript "image" named .png ran an interpreter on the data's behalf.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def _open_image(path: str | Path) -> Image.Image:
    """An image file opened, its header read and nothing decoded (the caller closes it). Only the
    :data:`RASTER_FORMATS` are tried, so no file reaches an external program; Pillow's limit is off for the header:
    the caller's check of the size, with its message, decides. Only a regular file is opened (a FIFO or a device would
    block the reader). Failures are ``DataError`` s counted by cause: missing file, unreadable file (another format,
    and any error of a format's reader, whatever its type: the data's fault, counted, never a crash of ``on_error:
    skip``)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"cannot read image {path}: not a regular file", UNREADABLE_IMAGE)
        with _pillow_limit(None):
            return Image.open(path, formats=RASTER_FORMATS)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"image {path} does not exist", MISSING_IMAGE) from e
    except UnidentifiedImageError as e:
        raise DataError(
            f"cannot read image {path}: not an image of the formats read ({', '.join(RASTER_FORMATS)})",
            UNREADABLE_IMAGE,
        ) from e
    except Exception as e:  # a reader's error of any type (SyntaxError, struct.error, EOFError, ...)
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", UNREADABLE_IMAGE) from e


def image_size(path: str | Path) -> tuple[int, int]:
    """An image's width and height as stored, from its header alone."""
    with _open_image(path) as im:
        return im.size


def check_size(path: str | Path, size: tuple[int, int], max_pixels: int | None, padded: bool = True) -> None:
    """Refuse an image whose padded square (``pad_to_square``: a 1 x 1,000,000 strip is as large as it becomes) is
    over ``max_pixels`` (``data.max_image_pixels``; None: no limit), or, for a stage that crops (``padded`` False:
    nothing pads it), the image itself. The same for the size as stored and as shown after its EXIF orientation: a
    turn or a mirror keeps both. (``crop`` bounds its own resize too: :func:`resize_and_crop`; its padded square
    had refused every image longer than about 7071 pixels on a side at the default limit, a tall screenshot or a
    panorama that the crop reads as well as any.)"""
    width, height = size
    area = max(width, height) ** 2 if padded else width * height
    if max_pixels and area > max_pixels:
        shape = f"padded to a square {area}" if padded else f"{area} in all"
        raise DataError(
            f"image {path} has {width}x{height} pixels, {shape}, over data.max_image_pixels={max_pixels}",
            IMAGE_TOO_LARGE,
        )


def load_rgb(path: str | Path, max_pixels: int | None = MAX_PIXELS, padded: bool = True) -> Image.Image:
    """Open an image fully (so a truncated file fails here, not later) and convert it to RGB as an exported model's
    processor sees it.

    The size is read from the header and checked against ``max_pixels`` (:func:`check_size`: the padded square, or
    under ``crop``, ``padded`` False, the image itself) before anything is decoded, so a decompression bomb (a few
    hundred kilobytes that expand to gigabytes) costs nothing; while decoding, Pillow's own limit is the same
    (:func:`_pillow_limit`: a GIF frame larger than its header said). The image is then turned upright by its EXIF
    orientation (as transformers' ``load_image`` does: a portrait photo trained sideways),
    and transparency (an alpha band, or a palette or colour marked transparent) is composited onto white (as
    transformers' ``convert_rgb`` does: ``convert("RGB")`` kept whatever colour hid under transparent pixels).
    16-bit grey images are scaled to 8 bits (convert() clips them); 32-bit integer or float pixels, whose range
    nothing states, are refused. Only the :data:`RASTER_FORMATS` are read. Failures are ``DataError`` s counted by
    cause: missing file, image too large, unreadable file (any error of the decoder, whatever its type).
    """
    with _open_image(path) as im:
        check_size(path, im.size, max_pixels, padded)
        try:
            with _pillow_limit(max_pixels):
                im.load()
            upright = ImageOps.exif_transpose(im)
            if upright.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("RGB") clips at 255 (mid-grey: white)
                grey = np.asarray(upright).astype(np.uint32)
                return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
            if upright.mode in ("I", "F"):  # 32-bit integer or float pixels: no range that says what is white
                raise DataError(
                    f"cannot read image {path}: its {upright.mode!r} pixels (32-bit "
                    f"{'integers' if upright.mode == 'I' else 'floats'}) have no fixed range to map to 8 bits (Pillow "
                    "would clip them to black or white); save it as an 8 or 16-bit image",
                    UNREADABLE_IMAGE,
                )
            return on_white(upright)
        except DataError:
            raise
        except Image.DecompressionBombError as e:
            raise DataError(f"image {path}: {e}", IMAGE_TOO_LARGE) from e
        except Exception as e:  # a decoder's error of any type (EOFError, struct.error, ...), as in _open_image
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", UNREADABLE_IMAGE) from e


def on_white(image: Image.Image) -> Image.Image:
    """The image in RGB, any transparency composited onto white, exactly as transformers' ``convert_rgb`` does."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas so resizing keeps the aspect ratio."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def check_aspect_ratio(value: Any, key: str = "data.image_aspect_ratio") -> str:
    """``value`` if it is one of :data:`ASPECT_RATIOS`, else a ``ConfigError`` naming ``key`` (a stage's
    ``data.image_aspect_ratio``): checked before any image is read, so a misspelt value never reaches a sample."""
    if not isinstance(value, str) or value not in ASPECT_RATIOS:
        raise ConfigError(
            f"{key}={value!r} is not known; choose pad (pad to a square with the tower's mean colour, LLaVA-1.5's "
            "instruction tuning) or crop (shorter side resized, centre cropped: LLaVA-1.5's pretraining)"
        )
    return value


def shorter_side_resized(width: int, height: int, side: int) -> tuple[int, int]:
    """The ``(width, height)`` transformers' CLIP image processor resizes an image to for ``size: {shortest_edge:
    side}``: the shorter side ``side``, the longer in proportion, truncated (``get_resize_output_image_size``)."""
    short, long = min(width, height), max(width, height)
    longer = int(side * long / short)
    return (side, longer) if width <= height else (longer, side)


def check_crop_size(path: str | Path | None, size: tuple[int, int], side: int, max_pixels: int | None) -> None:
    """Refuse an image ``size`` whose resize to ``side`` on its shorter side, before ``crop`` cuts out its centre
    (:func:`resize_and_crop`), is over ``max_pixels`` (None: no limit). What reads images for a cropping stage without
    preprocessing them (the feature cache's check of the images it lacks or holds) asks the same, so a sample is
    refused, and counted as too large, whether its features are cached or not."""
    width, height = size
    new_width, new_height = shorter_side_resized(width, height, side)
    if max_pixels and new_width * new_height > max_pixels:
        raise DataError(
            f"{'' if path is None else f'image {path}: '}a {width}x{height} image resized to {new_width}x{new_height} "
            f"before its centre crop (data.image_aspect_ratio=crop) has {new_width * new_height} pixels, over "
            f"data.max_image_pixels={max_pixels}",
            IMAGE_TOO_LARGE,
        )


def resize_and_crop(image: Image.Image, side: int, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image resized (bicubic) to ``side`` on its shorter side, then its centre ``side`` x ``side`` (the corner
    rounded down): transformers' CLIP image processor, step for step, so the pixels are LLaVA's.

    The whole image is resized before the crop, as there (resizing only the kept region in Pillow gives other
    pixels). Resized, a thin strip is large (a 1 x 7000 one at 336: 800 M pixels), so one over ``max_pixels``
    (``data.max_image_pixels``; None: no limit) is refused, counted as too large, before it is allocated."""
    check_crop_size(None, image.size, side, max_pixels)
    new_width, new_height = shorter_side_resized(*image.size, side)
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - side) // 2, (new_height - side) // 2
    return resized.crop((left, top, left + side, top + side))


def preprocess(
    image: Image.Image, spec: ImageSpec, aspect_ratio: str = "pad", max_pixels: int | None = MAX_PIXELS
) -> torch.Tensor:
    """PIL image -> normalised ``[3, size, size]`` float tensor as the tower expects, made square as
    ``aspect_ratio`` says (:data:`ASPECT_RATIOS`). Its default, ``pad``, is what every checkpoint trained before the
    setting existed saw; whatever preprocesses for a stage's checkpoint passes that stage's
    ``data.image_aspect_ratio``. ``max_pixels`` bounds what ``crop`` resizes (:func:`resize_and_crop`)."""
    if check_aspect_ratio(aspect_ratio, "image_aspect_ratio") == "pad":
        square = pad_to_square(image, tuple(int(m * 255) for m in spec.mean))  # truncated, as LLaVA and transformers do
        image = square.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    else:
        image = resize_and_crop(image, spec.size, max_pixels)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x - mean) / std


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (SLURM's --cpus-per-task, a cgroup), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes(world_size: int) -> int:
    """Processes on this node, which share its CPUs: torchrun's and accelerate's LOCAL_WORLD_SIZE, else all of them."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def loader_workers(setting: Any, device: torch.device, world_size: int = 1) -> int:
    """Processes that decode images ahead of ``device``: a number, or auto, the one rule of training, evaluation and
    the prepare steps: on CUDA ``min(8, CPUs of this process / processes on its node)`` (SLURM's --cpus-per-task, not
    the machine's count), on the CPU 0, where workers would take the cores the model runs on."""
    if setting == "auto":
        return min(8, usable_cpus() // local_processes(world_size)) if device.type == "cuda" else 0
    return int(setting)


@dataclass
class DecodedBatch:
    """One batch of :func:`decoded_batches`: where its images stand in the paths given (``index``, in order), what
    ``prepare`` made of each that could be read (``items``: stacked when they are tensors), their sizes as stored
    when asked for, and the errors of those that could not, by place."""

    index: list[int]
    items: Any
    sizes: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[int, DataError] = field(default_factory=dict)

    def pin_memory(self) -> DecodedBatch:
        """The batch with its stacked items in pinned memory: ``DataLoader(pin_memory=True)``'s thread calls it, so
        their copy to the GPU need not wait."""
        if isinstance(self.items, torch.Tensor):
            self.items = self.items.pin_memory()
        return self


class _Prepared(Dataset):
    """``prepare`` of each path, or the ``DataError`` it raised: one unreadable image is its own, not its batch's."""

    def __init__(self, paths: Sequence[Path], prepare: Callable[[Path], Any], sizes: bool) -> None:
        self.paths, self.prepare, self.sizes = list(paths), prepare, sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, tuple[int, int] | None, DataError | None]:
        try:
            item = self.prepare(self.paths[i])
            return i, item, image_size(self.paths[i]) if self.sizes else None, None
        except DataError as e:
            return i, None, None, e


def _collate(rows: list[tuple[int, Any, tuple[int, int] | None, DataError | None]]) -> DecodedBatch:
    """A batch assembled in the worker: the readable images' items stacked there (tensors), so the main process
    receives one block, pinned on CUDA."""
    good = [(i, item, size) for i, item, size, error in rows if error is None]
    items = [item for _, item, _ in good]
    return DecodedBatch(
        index=[i for i, _, _ in good],
        items=torch.stack(items) if items and isinstance(items[0], torch.Tensor) else items,
        sizes=[size for _, _, size in good if size is not None],
        errors={i: error for i, _, _, error in rows if error is not None},
    )


def decoded_batches(
    paths: Sequence[Path],
    prepare: Callable[[Path], Any],
    batch_size: int,
    device: torch.device,
    num_workers: Any = 0,
    sizes: bool = False,
    raise_unreadable: bool = False,
) -> Iterator[DecodedBatch]:
    """``prepare`` (a decode and a preprocessing, e.g. ``preprocess(load_rgb(path), spec)``) of every path,
    ``batch_size`` at a time, in order: the batches are the same whatever ``num_workers``.

    ``num_workers`` (a number, or auto: :func:`loader_workers` for ``device``) processes decode ahead of the device,
    into pinned memory on CUDA, as generation's batches do: decoded one at a time in the main process, an image cost
    5-7 ms while the GPU waited (86 % of a 558k-image scoring pass with a bf16 CLIP-L). An image ``prepare`` cannot
    read (a ``DataError``) is left out of its batch with its error, for the caller to skip; ``raise_unreadable``
    raises the first of a batch instead, naming it, as a read in this process did. ``sizes``: each readable
    image's size as stored, read in the worker too (:func:`image_size`). ``prepare`` runs in the workers: a module
    function or a ``functools.partial`` of one, holding no model. The loader draws its workers' seeds from a
    generator of its own: from torch's global stream, a feature-cache fill before training moved every random draw
    after it (an objective's label sampling, dropout), so the run that filled a cache trained to other numbers than
    its rerun."""
    loader = DataLoader(
        _Prepared(paths, prepare, sizes),
        batch_size=batch_size,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(0),  # nothing here is random: the seed only keeps the stream apart
        num_workers=(workers := loader_workers(num_workers, device)),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for batch in loader:
        if raise_unreadable and batch.errors:
            raise batch.errors[min(batch.errors)]
        yield batch


def prepared(spec: ImageSpec, reading: ImageReading, path: Path) -> torch.Tensor:
    """An image file read (:func:`load_rgb`) and preprocessed for ``spec``: what :func:`decoded_batches`' workers run
    for a reader that prepares pixels itself (``functools.partial(prepared, spec, reading)``). Its size is checked as
    the training dataset checks it under ``reading``: its limit, and under ``crop`` the image itself, not the square
    it would pad to (a 300x8000 screenshot that a crop stage trained on had stopped the probe and a method's label
    pass)."""
    padded = reading.aspect_ratio == "pad"
    image = load_rgb(path, reading.max_pixels, padded)
    return preprocess(image, spec, reading.aspect_ratio, reading.max_pixels)
