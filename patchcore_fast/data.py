"""Step 1 of the method and the data layouts: finding, reading and preparing images.

Images are read with Pillow, turned upright by their EXIF orientation and converted to
8-bit RGB (grey, palette, RGBA, CMYK and 16-bit images included). They are resized
(bilinear; the shorter side to ``image_size`` as the paper, or the longer side with padding,
or both sides: :mod:`~patchcore_fast.geometry`), centre-cropped to ``crop`` x ``crop`` (or
not) and normalised with the backbone's mean and standard deviation. Ground-truth masks
follow the same geometry with nearest-neighbour resizing, so they stay binary.

Files that cannot be read (zero bytes, truncated, not an image) are skipped with a
:class:`~patchcore_fast.errors.SkippedFileWarning` naming the file, and counted.

Layouts:

* MVTec AD: ``<root>/<category>/train/good``, ``test/<good|defect>``,
  ``ground_truth/<defect>/<name>_mask.png`` (any image extension).
* Folders: good images for fitting; for evaluation, a good folder, a defective folder
  (images, or one sub-folder per defect type) and optionally a mask folder whose files are
  named like the images (``<name>.png`` or ``<name>_mask.png``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import LargeImageWarning, PatchCoreError, SkippedFileWarning, first_line
from .geometry import Placement, place

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The Pillow decoders used, whatever the file's extension says; other formats Pillow knows
# (GIF, WebP, ...) are named as unsupported rather than read or called unreadable.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF")
# Image formats Pillow does not read either, named in messages by their extension.
_OTHER_IMAGE_EXTENSIONS = {".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG", ".raw": "RAW",
                           ".cr2": "Canon RAW", ".nef": "Nikon RAW", ".dng": "DNG"}
# Pixel budget of the resized image before the centre crop. Resizing the shorter side to
# image_size makes an image of image_size^2 * aspect pixels: fine for photos, but a
# 474-byte 1 x 100,000 PNG would become 256 x 25,600,000 (20 GB as RGB). Above the budget
# only the source region behind the crop is resized (same crop, crop^2 pixels of memory).
MAX_RESIZED_PIXELS = 50_000_000
# Largest model input without a crop (``--resize shorter --crop none`` keeps the photo's
# aspect): the pixels of the largest square input, 2,048 x 2,048 (65,536 patches). A
# longer photo would give proportionally more patches; it is skipped, naming the way out.
MAX_INPUT_PIXELS = 2048 * 2048

#: ImageNet normalisation (RGB), the statistics every supported backbone was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        import torchvision.io as tio

        with warnings.catch_warnings():
            # Deprecated since torchvision 0.29 in favour of TorchCodec; once removed, the
            # import fails here and Pillow reads every file.
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


@dataclass(frozen=True)
class Preprocess:
    """Resize, pad, crop, normalise (geometry.py describes the moves and the way back).

    Attributes:
        image_size: target side of the resize (shorter side, longer side or both).
        crop: side of the centre crop (<= image_size); 0 keeps the whole resized image.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation.
        max_pixels: pixel budget of the resized image (:data:`MAX_RESIZED_PIXELS`).
        resize: ``shorter`` (paper), ``longer`` (padded square) or ``stretch``.
    """

    image_size: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = MAX_RESIZED_PIXELS
    resize: str = "shorter"

    def placement(self, size: tuple[int, int]) -> Placement:
        """Where a photo of ``size`` (width, height) lands in the model's input."""
        return place(size, self.resize, self.image_size, self.crop)

    @property
    def fixed_input(self) -> bool:
        """Whether every photo gives an input of the same shape: a crop, or a resize to a
        square (``longer``, ``stretch``). Only ``shorter`` without a crop keeps each
        photo's aspect, so its inputs (and feature grids) differ."""
        return bool(self.crop) or self.resize != "shorter"

    def oversize(self, size: tuple[int, int]) -> str | None:
        """Why an image of ``size`` (width, height) takes the bounded path, or None.

        Above :attr:`max_pixels` after resizing, :meth:`display` resizes only the region
        behind the crop; the model then sees a sliver of an extreme panorama, which the
        message says. (Only ``shorter`` can exceed the budget; without a crop such an
        image cannot be read at all: :meth:`display` raises.)
        """
        w, h = size
        p = self.placement(size)
        rw, rh = p.canvas
        if rw * rh <= self.max_pixels:
            return None
        seen = 100.0 * (self.crop / rw) * (self.crop / rh)
        return (f"{w:,} x {h:,} pixels would be {rw:,} x {rh:,} after resizing, above the "
                f"budget of {self.max_pixels:,} pixels: only the region behind the centre "
                f"crop is resized (the model sees {seen:.2g} % of the image)")

    def _geometry(self, img: Image.Image, resample: int, fill: tuple[int, ...] | int
                  ) -> Image.Image:
        p = self.placement(img.size)
        left, top, bw, bh = p.box
        if not self.crop and bw * bh > min(self.max_pixels, MAX_INPUT_PIXELS):
            w, h = img.size
            raise UnreadableImage(
                f"{w:,} x {h:,} pixels would be a {bw:,} x {bh:,} input without a crop, above "
                f"{min(self.max_pixels, MAX_INPUT_PIXELS):,} pixels; fit with --resize longer "
                f"or a --crop")
        if p.canvas[0] * p.canvas[1] > self.max_pixels:
            return self._bounded_geometry(img, resample, p.resized, left, top)
        img = img.resize(p.resized, resample)
        if p.canvas != p.resized:  # longer: centre the photo on a padded square
            canvas = Image.new(img.mode, p.canvas, fill)
            canvas.paste(img, p.offset)
            img = canvas
        if (bw, bh) != img.size:
            img = img.crop((left, top, left + bw, top + bh))
        return img

    def _bounded_geometry(self, img: Image.Image, resample: int, size: tuple[int, int],
                          left: int, top: int) -> Image.Image:
        """The crop of :meth:`_geometry` without making the resized image.

        Pillow resizes in two separable passes, horizontal then vertical, rounding to 8 bits
        in between. Output pixel (i, j) of the crop sits at source point
        ((left + i + 0.5) sx, (top + j + 0.5) sy), sx = w / size[0]; a pass over the source
        box that starts at (left sx, top sy) and spans crop pixels maps it to the same
        point, and the filter is clipped at the image's edges, not the box's. So: keep the
        source rows the vertical filter can reach (its support, ``max(sy, 1)`` rows either
        side for bilinear, plus a margin), run the horizontal pass on the crop's columns,
        then the vertical pass on the crop's rows. Memory: crop x (rows kept) pixels. The
        box coordinates are floats, so filter weights can differ in the last bit: pixels
        agree to within one 8-bit level (bilinear), nearest-neighbour picks within a pixel.
        """
        w, h = img.size
        sx, sy = w / size[0], h / size[1]
        reach = math.ceil(max(sy, 1.0)) + 2
        y0 = max(0, math.floor(top * sy) - reach)
        y1 = min(h, math.ceil((top + self.crop) * sy) + reach)
        band = img.crop((0, y0, w, y1))
        band = band.resize((self.crop, y1 - y0), resample,
                           box=(left * sx, 0, (left + self.crop) * sx, y1 - y0))
        return band.resize((self.crop, self.crop), resample,
                           box=(0, top * sy - y0, self.crop, (top + self.crop) * sy - y0))

    def display(self, img: Image.Image) -> np.ndarray:
        """The model's input as uint8 [H_in, W_in, 3] (before normalising).

        ``longer``'s padding is the normalisation mean, so it normalises to 0.
        """
        fill = tuple(int(round(255 * m)) for m in self.mean)
        return np.asarray(self._geometry(img, Image.BILINEAR, fill))

    def image(self, img: Image.Image) -> Tensor:
        """Tensor[3, H_in, W_in] float32, normalised (``crop`` x ``crop`` with a crop)."""
        x = torch.from_numpy(self.display(img).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def mask(self, img: Image.Image | None, size: tuple[int, int] | None = None) -> Tensor:
        """A mask put through the image's geometry, cut to the pixels that show the photo
        (the ground truth of :meth:`Placement.to_crop` maps).

        Args:
            img: the mask (mode L), or None: a good image, all False.
            size: (width, height) of the photo when ``img`` is None (without it: the
                crop's square, as a ``shorter`` geometry gives).

        Returns:
            Tensor[h, w] bool.
        """
        if img is None and size is None:
            if not self.crop:
                raise ValueError("an absent mask needs the photo's size when there is no crop")
            return torch.zeros(self.crop, self.crop, dtype=torch.bool)
        p = self.placement(img.size if img is not None else size)
        x0, y0, x1, y1 = p.visible()
        if img is None:
            return torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
        m = torch.from_numpy(np.asarray(self._geometry(img, Image.NEAREST, 0)) > 0)
        return m[y0:y1, x0:x1]


def warn_skipped(path: str | os.PathLike, why: str) -> None:
    """Warn that a file is left out (one line naming it)."""
    warnings.warn(f"skipping {path}: {why}", SkippedFileWarning, stacklevel=2)


def skip_file(path: str | os.PathLike, why: str, skipped: list[str] | None) -> None:
    """Warn that a file is left out (:func:`warn_skipped`) and append it to ``skipped``."""
    warn_skipped(path, why)
    if skipped is not None:
        skipped.append(str(path))


def _not_a_file(p: Path) -> str | None:
    """Why a folder entry cannot be an image file (None: a regular file, or a link to one)."""
    if p.is_symlink() and not p.exists():
        return f"dangling symbolic link (to {os.readlink(p)})"
    if p.is_dir():
        return None  # sub-folders are not searched (not an input file)
    if not p.is_file():
        return "not a regular file (a device, pipe or socket)"
    return None


def list_images(inputs: Sequence[str | os.PathLike], what: str = "input",
                skipped: list[str] | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Inside a folder, every entry left out is warned about, naming it, and appended to
    ``skipped``: files with an extension that is not an image's, images in formats this
    tool does not read (GIF, WebP, ...), dangling symbolic links, devices and pipes. Hidden
    files and sub-folders are ignored (folders are not searched recursively).

    Args:
        inputs: image files and/or folders.
        what: what the inputs are, for messages (e.g. ``"training folder"``).
        skipped: list that collects the paths left out.

    Returns:
        list of paths in the given order, folder contents sorted by name.
    """
    if not inputs:
        raise PatchCoreError(f"no {what} given")
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_symlink() and not p.exists():
            raise PatchCoreError(f"{what} {p} is a dangling symbolic link (to "
                                 f"{os.readlink(p)})")
        if not p.exists():
            raise PatchCoreError(f"{what} {p} does not exist")
        if p.is_dir():
            images = []
            for f in sorted(f for f in p.iterdir() if not f.name.startswith(".")):
                why = _not_a_file(f)
                fmt = None if why or f.is_dir() else unsupported_format(f)
                if why:
                    skip_file(f, why, skipped)
                elif f.is_dir():
                    continue
                elif f.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(f)
                elif fmt:
                    skip_file(f, unsupported_message(fmt), skipped)
                else:
                    skip_file(f, f"not an image file (extension {f.suffix or 'none'})",
                              skipped)
            if not images:
                raise PatchCoreError(f"{what} {p} holds no images "
                                     f"({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(images)
        elif fmt := unsupported_format(p):
            skip_file(p, unsupported_message(fmt), skipped)
        else:
            out.append(p)
    return out


class ImageFiles(Dataset):
    """Images of a list of files, preprocessed; unreadable files give ``None``.

    Args:
        paths: image files.
        preprocess: geometry and normalisation.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None, str | None]:
        """(index, Tensor[3, H_in, W_in] or None, why it was skipped, a note to warn)."""
        try:
            img = read_image(self.paths[i])
            return i, self.preprocess.image(img), None, self.preprocess.oversize(img.size)
        except UnreadableImage as exc:
            return i, None, str(exc), None


def _collate(items: list) -> tuple[list[tuple[list[int], Tensor]], list[tuple[int, str]],
                                   list[tuple[int, str]]]:
    """Readable images stacked by input shape (one group unless ``shorter`` without a crop
    met photos of different aspect), unreadable ones, warnings."""
    groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    for i, x, _, _ in items:
        if x is not None:
            groups.setdefault(tuple(x.shape), []).append((i, x))
    bad = [(i, why) for i, x, why, _ in items if x is None]
    notes = [(i, note) for i, _, _, note in items if note]
    stacks = [([i for i, _ in g], torch.stack([x for _, x in g])) for g in groups.values()]
    return stacks, bad, notes


def iterate_images(paths: Sequence[Path], preprocess: Preprocess, batch_size: int = 8,
                   num_workers: int = 0, skipped: list[str] | None = None,
                   progress: Callable[[int], None] | None = None, pin_memory: bool = False
                   ) -> Iterator[tuple[list[int], Tensor]]:
    """Batches of preprocessed images; unreadable files are skipped with a warning.

    Args:
        paths: image files.
        preprocess: geometry and normalisation.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 reads in this process).
        skipped: list collecting the paths left out.
        progress: called with the number of files handled after each batch.
        pin_memory: put batches in page-locked memory (for a CUDA model: the copy to the
            GPU is then asynchronous, ``non_blocking=True``).

    Yields:
        (indices into ``paths``, Tensor[B, 3, H_in, W_in]) for batches with readable images;
        a batch whose images differ in input shape comes as one batch per shape.
    """
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, shuffle=False,
                        pin_memory=pin_memory)
    for stacks, bad, notes in loader:
        # Warned here, in the main process (the readers may be worker processes).
        for i, note in notes:
            warnings.warn(f"{paths[i]}: {note}", LargeImageWarning, stacklevel=2)
        for i, why in bad:
            skip_file(paths[i], why, skipped)
        if progress is not None:
            progress(sum(len(i) for i, _ in stacks) + len(bad))
        yield from stacks


@dataclass(frozen=True)
class TestImage:
    """One evaluation image.

    Attributes:
        path: image file.
        label: 0 good, 1 defective.
        defect: defect type (``good`` for good images).
        mask: ground-truth mask file, or None (good image, or no masks given).
    """

    path: Path
    label: int
    defect: str
    mask: Path | None


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for cand in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


def is_mvtec_category(path: Path) -> bool:
    """True if ``path`` is an MVTec-style category folder (has ``train/good``)."""
    return (path / "train" / "good").is_dir()


def find_categories(root: str | os.PathLike) -> list[str]:
    """Names of the MVTec-style categories under ``root`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise PatchCoreError(f"data folder {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_mvtec_category(p))


def resolve_categories(root: str | os.PathLike, categories: Sequence[str]
                       ) -> list[tuple[str, Path]]:
    """(name, folder) of each requested category under ``root``; ``all`` means every
    category found (:func:`mvtec_categories` handles a data path without categories)."""
    root = Path(root)
    if list(categories) == ["all"]:
        names = find_categories(root)
        if not names:
            raise PatchCoreError(f"no MVTec-style categories (<name>/train/good) in {root}")
        return [(n, root / n) for n in names]
    out = []
    for name in categories:
        folder = root / name
        if not is_mvtec_category(folder):
            found = find_categories(root)
            hint = f"; found: {', '.join(found)}" if found else ""
            raise PatchCoreError(f"no category {name!r} in {root} (expected "
                                 f"{folder}/train/good){hint}")
        out.append((name, folder))
    return out


def mvtec_categories(data: Path, category: Sequence[str] | None
                     ) -> list[tuple[str, Path]] | None:
    """(name, folder) of the MVTec-style categories that a data path and ``--category``
    name; None when the path is neither a data set root with categories nor a category
    folder itself."""
    if not data.exists():
        raise PatchCoreError(f"data folder {data} does not exist")
    if category:
        return resolve_categories(data, category)
    if is_mvtec_category(data):
        return [(data.name, data)]
    return None


def mvtec_test(category_dir: Path, skipped: list[str] | None = None) -> list[TestImage]:
    """Test images of an MVTec-style category with labels, defect types and masks."""
    test = category_dir / "test"
    if not test.is_dir():
        raise PatchCoreError(f"{category_dir} has no test folder")
    items = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        label = 0 if sub.name == "good" else 1
        gt = category_dir / "ground_truth" / sub.name
        for path in list_images([sub], "test folder", skipped):
            mask = _find_mask(gt, path.stem) if label else None
            items.append(TestImage(path, label, sub.name, mask))
    if not items:
        raise PatchCoreError(f"{test} holds no test images")
    return items


def folder_test(good: str | os.PathLike, defective: str | os.PathLike,
                masks: str | os.PathLike | None = None,
                skipped: list[str] | None = None) -> list[TestImage]:
    """Evaluation images from plain folders (anomalib's Folder layout).

    Args:
        good: folder of good images.
        defective: folder of defective images, or of one sub-folder per defect type.
        masks: folder of masks named like the images (optionally with ``_mask``), with the
            same sub-folders as ``defective``; None when there are no masks.
        skipped: list collecting the paths left out.

    Returns:
        list of :class:`TestImage`.
    """
    items = [TestImage(p, 0, "good", None) for p in list_images([good], "good folder", skipped)]
    defective = Path(defective)
    if not defective.is_dir():
        raise PatchCoreError(f"defective folder {defective} does not exist")
    subs = sorted(p for p in defective.iterdir() if p.is_dir())
    groups = [(s.name, s) for s in subs] if subs else [("defective", defective)]
    for name, folder in groups:
        mask_dir = None
        if masks is not None:
            mask_dir = Path(masks) / name if subs else Path(masks)
            if not mask_dir.is_dir():
                raise PatchCoreError(f"mask folder {mask_dir} does not exist")
        for path in list_images([folder], "defective folder", skipped):
            mask = _find_mask(mask_dir, path.stem) if mask_dir else None
            items.append(TestImage(path, 1, name, mask))
    return items
