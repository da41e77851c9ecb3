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

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputWarning, PatchCoreError, first_line
from .files import text_name

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


#: How each EXIF orientation (2-8) turns a photo upright: Pillow's ``exif_transpose``.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _png_may_orient(data: bytes) -> bool:
    """Whether a PNG's chunks may record an orientation, wherever they sit (before or after
    the pixels).

    Pillow, the authority on orientation here, finds one in an ``eXIf`` chunk, in a text
    chunk ``Raw profile type exif`` (ImageMagick's way) or as ``tiff:Orientation`` in XMP
    (``XML:com.adobe.xmp``). A chunk that may hold one says yes; an XMP packet is read
    (uncompressed, as MVTec AD's are) and says yes only when it mentions an orientation.
    A file that cannot be walked as PNG chunks says yes too: Pillow decides.
    """
    i = 8
    while i + 8 <= len(data):
        n, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        if kind == b"eXIf":
            return True
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            key, _, rest = body.partition(b"\0")
            if key.startswith(b"Raw profile type"):
                return True
            if key == b"XML:com.adobe.xmp":
                compressed = kind == b"zTXt" or (kind == b"iTXt" and rest[:1] != b"\0")
                if compressed or b"orientation" in rest.lower():
                    return True
        if kind == b"IEND":
            return False
        i += 12 + n
    return True


def _orientation(img: Image.Image, data: bytes | None = None) -> int:
    """The one decision on how a photo is turned upright: its EXIF orientation (1-8).

    Every reader asks this, once per file: :func:`read_image` (pixels), :func:`image_size`
    (size, without decoding), :func:`read_mask`; so size, pixels, map, overlay and mask
    agree by construction. Pillow answers (``getexif``), except for a PNG whose chunks
    cannot record an orientation (:func:`_png_may_orient`): 1, without decoding it (for a
    PNG, Pillow's ``getexif`` decodes the whole image to find chunks after the pixels).

    Args:
        img: the file opened by Pillow.
        data: the file's bytes, when already read (a PNG's chunks are walked in them).
    """
    if img.format == "PNG":
        if data is None:
            with open(img.filename, "rb") as fh:
                data = fh.read()
        if not _png_may_orient(data):
            return 1
    orientation = img.getexif().get(0x0112, 1)
    return orientation if orientation in _UPRIGHT else 1


def _decode_png(path: Path, img: Image.Image) -> Image.Image | None:
    """Decode a plain 8-bit RGB PNG with torchvision.io (libpng), or None for Pillow.

    Measured on bottle's 900 x 900 PNGs (2-core EPYC): torchvision.io 158-181 ms a file,
    Pillow 225-238 ms, the same pixels (tests/test_decode.py). Only the case where both
    give the same pixels by construction takes this path: PNG, 8 bits per channel, RGB
    without transparency, upright (:func:`_orientation` is 1: no chunk records another
    orientation). Anything else, and any file libpng refuses, goes to Pillow, which reads
    it or says why it cannot.

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
            if _orientation(img, data.numpy().tobytes()) != 1:
                return None
            x = tio.decode_png(data, mode=tio.ImageReadMode.RGB)
    except Exception:  # libpng's refusal: let Pillow read the file or say why it cannot
        return None
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _open(path: Path) -> Image.Image:
    """Open an image file (header only), in the formats this tool reads."""
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Between Pillow's warning (89 M pixels) and error (179 M pixels) limits a
        # photo is big, not hostile: read it (a 10,000 x 10,000 RGB image is 300 MB
        # for a moment). Above the error limit the file is skipped, naming its size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            other = _other_format(path)
            if other:
                raise UnreadableImage(unsupported_message(other)) from None
            raise


def _upright(img: Image.Image) -> Image.Image:
    """The decoded image turned upright by :func:`_orientation` (decoded now: a truncated
    file fails here, not later in a worker)."""
    orientation = _orientation(img)
    img.load()
    return img.transpose(_UPRIGHT[orientation]) if orientation != 1 else img


@contextlib.contextmanager
def _reading(path: Path):
    """Turn every failure to read an image into :class:`UnreadableImage` saying why."""
    try:
        yield
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
    with _reading(path), _open(path) as img:
        decoded = _decode_png(path, img) if fast else None
        return decoded if decoded is not None else _to_8bit_rgb(_upright(img))


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
    with _reading(Path(path)), _open(Path(path)) as img:
        w, h = img.size
        # Orientations 5-8 transpose the photo: width and height swap.
        return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)


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


#: Formats whose compression changes pixel values (a mask's edges ring).
LOSSY_FORMATS = ("JPEG",)


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Read a ground-truth mask, upright as its photo, as a binary 8-bit image (0 / 255).

    What a mask is: a pixel is defect when its value is not zero, read at the file's own
    depth (a 16-bit mask holding label 1 is defect there; no conversion to 8 bits first)
    and in every colour channel (any non-zero channel; a palette pixel by its colour),
    except where an alpha channel makes it transparent (alpha 0: background, whatever its
    colour). A lossy file (JPEG) rings around edges, so there a pixel is defect from half
    the scale up (128 of 255), and the mask is named in a warning. A mask that marks no
    pixel, or every pixel, is named in a warning too (still used as it is).

    Raises:
        UnreadableImage: empty, truncated or not an image.
    """
    path = Path(path)
    with _reading(path), _open(path) as img:
        fmt = img.format
        img = _upright(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        a = np.asarray(img)
    bands = img.getbands()
    a = a if a.ndim == 3 else a[..., None]
    colour = a[..., [i for i, b in enumerate(bands) if b != "A"]]
    lossy = fmt in LOSSY_FORMATS
    defect = ((colour >= 128) if lossy else (colour != 0)).any(axis=-1)
    if "A" in bands:
        defect &= a[..., bands.index("A")] > 0
    name = text_name(path)
    if lossy:
        warnings.warn(f"mask {name} is {fmt} (lossy): pixels from 128 of 255 count as "
                      f"defect, the ringing below not", InputWarning, stacklevel=2)
    if not defect.any() or defect.all():
        warnings.warn(f"mask {name} marks {'no' if not defect.any() else 'every'} pixel as "
                      f"defect", InputWarning, stacklevel=2)
    return Image.fromarray(defect.astype(np.uint8) * 255)

