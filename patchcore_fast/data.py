"""Step 1 of the method and the data layouts: finding, reading and preparing images.

Images are read with Pillow, turned upright by their EXIF orientation and converted to
8-bit RGB (grey, palette, RGBA, CMYK and 16-bit images included). They are resized so the
shorter side is ``image_size`` (bilinear), centre-cropped to ``crop`` x ``crop`` and
normalised with the backbone's mean and standard deviation. Ground-truth masks follow the
same geometry with nearest-neighbour resizing, so they stay binary.

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

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import PatchCoreError, SkippedFileWarning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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


def read_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image.

    Args:
        path: image file.

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
            img = Image.open(path)
        with img:
            img.load()  # decode now: truncated files fail here, not later in a worker
            img = ImageOps.exif_transpose(img)
            return _to_8bit_rgb(img)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's "
                              f"decompression-bomb limit)") from None
    except Exception as exc:  # Pillow raises many types for broken files
        text = str(exc).strip().splitlines()
        why = text[0] if text else type(exc).__name__
        if "cannot identify image file" in why:
            why = "not an image"
        raise UnreadableImage(why) from None


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
        text = str(exc).strip().splitlines()
        raise UnreadableImage(text[0] if text else type(exc).__name__) from None


def read_mask(path: str | os.PathLike) -> Image.Image:
    """Read a ground-truth mask as a binary 8-bit image (any non-zero pixel is defect)."""
    img = read_image(path)
    a = np.asarray(img.convert("L")) > 0
    return Image.fromarray((a * 255).astype(np.uint8))


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, normalise.

    Attributes:
        image_size: shorter side after resizing.
        crop: side of the centre crop (<= image_size).
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation.
    """

    image_size: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _geometry(self, img: Image.Image, resample: int) -> Image.Image:
        w, h = img.size
        scale = self.image_size / min(w, h)
        size = (max(self.crop, round(w * scale)), max(self.crop, round(h * scale)))
        img = img.resize(size, resample)
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        return img.crop((left, top, left + self.crop, top + self.crop))

    def display(self, img: Image.Image) -> np.ndarray:
        """The resized, cropped image as uint8 [crop, crop, 3] (for overlays)."""
        return np.asarray(self._geometry(img, Image.BILINEAR))

    def image(self, img: Image.Image) -> Tensor:
        """Tensor[3, crop, crop] float32, normalised."""
        x = torch.from_numpy(self.display(img).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def mask(self, img: Image.Image | None) -> Tensor:
        """Tensor[crop, crop] bool; an absent mask (good image) is all False."""
        if img is None:
            return torch.zeros(self.crop, self.crop, dtype=torch.bool)
        return torch.from_numpy(np.asarray(self._geometry(img, Image.NEAREST)) > 0)


def warn_skipped(path: str | os.PathLike, why: str) -> None:
    """Warn that a file is left out (one line naming it)."""
    warnings.warn(f"skipping {path}: {why}", SkippedFileWarning, stacklevel=2)


def _is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".")


def list_images(inputs: Sequence[str | os.PathLike], what: str = "input",
                skipped: list[str] | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Files inside a folder without an image extension are skipped with a warning (and
    appended to ``skipped``); hidden files are ignored.

    Args:
        inputs: image files and/or folders (folders are not searched recursively).
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
        if not p.exists():
            raise PatchCoreError(f"{what} {p} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if _is_candidate(f))
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            for f in files:
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    warn_skipped(f, f"not an image file (extension {f.suffix or 'none'})")
                    if skipped is not None:
                        skipped.append(str(f))
            if not images:
                raise PatchCoreError(f"{what} {p} holds no images "
                                     f"({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(images)
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

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.preprocess.image(read_image(self.paths[i])), None
        except UnreadableImage as exc:
            return i, None, str(exc)


def _collate(items: list) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


def iterate_images(paths: Sequence[Path], preprocess: Preprocess, batch_size: int = 8,
                   num_workers: int = 0, skipped: list[str] | None = None,
                   progress: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[list[int], Tensor]]:
    """Batches of preprocessed images; unreadable files are skipped with a warning.

    Args:
        paths: image files.
        preprocess: geometry and normalisation.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 reads in this process).
        skipped: list collecting the paths left out.
        progress: called with the number of files handled after each batch.

    Yields:
        (indices into ``paths``, Tensor[B, 3, crop, crop]) for batches with readable images.
    """
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, shuffle=False)
    for indices, batch, bad in loader:
        for i, why in bad:
            warn_skipped(paths[i], why)
            if skipped is not None:
                skipped.append(str(paths[i]))
        if progress is not None:
            progress(len(indices) + len(bad))
        if batch is not None:
            yield indices, batch


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


def resolve_categories(root: str | os.PathLike, categories: Sequence[str] | None
                       ) -> list[tuple[str, Path]]:
    """(name, folder) of each requested category; ``all`` means every category found.

    Without categories, ``root`` itself must be a category folder (or, for fitting, a plain
    folder, which the caller handles).
    """
    root = Path(root)
    if not root.exists():
        raise PatchCoreError(f"data folder {root} does not exist")
    if not categories:
        return [(root.name, root)]
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
