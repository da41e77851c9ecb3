"""Step 1 of the method, first half: reading image files.

Images are read with Pillow (or, for plain 8-bit RGB PNGs, torchvision.io: the same
pixels, faster), turned upright by their EXIF orientation and converted to 8-bit RGB
(grey, palette, RGBA, CMYK and 16-bit images included). Ground-truth masks are read as
binary images. A file that cannot be read (zero bytes, truncated, not an image, a format
this tool does not read) raises :class:`UnreadableImage` saying why; the callers skip it
with a warning (:mod:`~patchcore_fast.datasets`). Where a photo then lands in the model's
input is :mod:`~patchcore_fast.geometry`'s.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PatchCoreError, first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The Pillow decoders used, whatever the file's extension says; other formats Pillow knows
# (GIF, WebP, ...) are named as unsupported rather than read or called unreadable.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF")
# Image formats Pillow does not read either, named in messages by their extension.
_OTHER_IMAGE_EXTENSIONS = {".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG", ".raw": "RAW",
                           ".cr2": "Canon RAW", ".nef": "Nikon RAW", ".dng": "DNG"}


class UnreadableImage(ValueError):
    """A file that is not a readable image (the message says why)."""


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit grey (``I;16*``, or ``I`` holding values above 255) is mapped linearly from
    [0, 65535] to [0, 255]; float images in [0, 1] are scaled to [0, 255].
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif img.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode_png(path: Path, img: Image.Image) -> Image.Image | None:
    """Decode a plain 8-bit RGB PNG with torchvision.io (libpng), or None for Pillow.

    Measured on bottle's 900 x 900 PNGs (2-core EPYC): torchvision.io 158-181 ms a file,
    Pillow 225-238 ms, the same pixels (tests/test_decode.py). Only the case where both
    give the same pixels by construction takes this path: PNG, 8 bits per channel, RGB
    without transparency, no EXIF chunk (which Pillow's path applies as a rotation).
    Anything else, and any file libpng refuses, goes to Pillow, which reads it or says why
    it cannot.

    Args:
        path: the file.
        img: it, opened by Pillow (header only: nothing decoded yet).
    """
    if (img.format != "PNG" or img.mode != "RGB" or "transparency" in img.info
            or not img.tile or img.tile[0][3] != "RGB"):
        return None
    try:
        # Here, not at start-up: deprecated since torchvision 0.29 in favour of TorchCodec;
        # once removed, the import fails here and Pillow reads every file.
        import torchvision.io as tio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            data = tio.read_file(str(path))
            if b"eXIf" in data.numpy().tobytes():
                return None
            x = tio.decode_png(data, mode=tio.ImageReadMode.RGB)
    except Exception:  # libpng's refusal: let Pillow read the file or say why it cannot
        return None
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def read_image(path: str | os.PathLike, fast: bool = True) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image.

    Args:
        path: image file.
        fast: decode plain 8-bit RGB PNGs with torchvision.io (:func:`_decode_png`: faster,
            the same pixels); False reads every file with Pillow.

    Returns:
        PIL image in mode ``RGB``.

    Raises:
        UnreadableImage: empty, truncated or not an image.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Between Pillow's warning (89 M pixels) and error (179 M pixels) limits a
            # photo is big, not hostile: read it (a 10,000 x 10,000 RGB image is 300 MB
            # for a moment). Above the error limit the file is skipped, naming its size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(path, formats=IMAGE_FORMATS)
            except UnidentifiedImageError:
                other = _other_format(path)
                if other:
                    raise UnreadableImage(unsupported_message(other)) from None
                raise
        with img:
            decoded = _decode_png(path, img) if fast else None
            if decoded is not None:
                return decoded
            img.load()  # decode now: truncated files fail here, not later in a worker
            img = ImageOps.exif_transpose(img)
            return _to_8bit_rgb(img)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's "
                              f"decompression-bomb limit)") from None
    except Exception as exc:  # Pillow raises many types for broken files
        why = first_line(exc)
        if "cannot identify image file" in why:
            why = "not an image"
        raise UnreadableImage(why) from None


def _other_format(path: Path) -> str | None:
    """The format of an image that Pillow can identify but this tool does not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.format
    except Exception:  # not an image at all
        return None


def unsupported_format(path: Path) -> str | None:
    """``GIF``, ``WEBP``, ... when the extension names an image format this tool does not
    read (Pillow's registry and a few camera / vector formats), else None."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS or not ext:
        return None
    Image.init()
    return Image.registered_extensions().get(ext) or _OTHER_IMAGE_EXTENSIONS.get(ext)


def unsupported_message(fmt: str) -> str:
    """Why an image in format ``fmt`` (e.g. ``GIF``) is left out, and what to do."""
    return (f"unsupported image format {fmt} (read: {', '.join(IMAGE_EXTENSIONS)}); "
            f"convert it to PNG")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as :func:`read_image` returns it (upright), read
    from the header without decoding the pixels.

    Raises:
        UnreadableImage: not an image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            # EXIF orientations 5-8 are transposed by exif_transpose: width and height swap.
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception as exc:
        raise UnreadableImage(first_line(exc)) from None


def read_size_again(path: str | os.PathLike) -> tuple[int, int]:
    """:func:`image_size` of a photo already read in this run (to put its map back).

    Raises:
        PatchCoreError: it cannot be read any more (it changed during the run).
    """
    try:
        return image_size(path)
    except UnreadableImage as exc:
        raise PatchCoreError(f"cannot read image {path} any more (changed during the run?): "
                             f"{exc}") from None


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Read a ground-truth mask as a binary 8-bit image (any non-zero pixel is defect)."""
    img = read_image(path)
    a = np.asarray(img.convert("L")) > 0
    return Image.fromarray((a * 255).astype(np.uint8))

