"""Which images a run reads: listing files and folders, the loader, the data layouts.

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

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import LargeImageWarning, PatchCoreError, SkippedFileWarning
from .files import check_outputs
from .geometry import Preprocess
from .images import (IMAGE_EXTENSIONS, UnreadableImage, read_image, unsupported_format,
                     unsupported_message)


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


def fit_targets(data: str | os.PathLike, categories: Sequence[str] | None,
                out: str | os.PathLike, weights: str | None = None
                ) -> list[tuple[str, Path, Path]]:
    """(name, training folder, model file) of each model that fit writes, checked before
    any work: every training folder exists, every model file can be written there (see
    :func:`~patchcore_fast.files.check_outputs`).

    Args:
        data: a folder of good images, or an MVTec-style root or category folder.
        categories: the categories under ``data`` (plain folder names, or ``all``).
        out: a ``.safetensors`` file, or the folder of one ``<name>.safetensors`` per model.
        weights: the backbone weights file read by the fit, if any (never overwritten).
    """
    option, given, data, out = f"-o {out}", Path(out), Path(data), Path(out)
    cats = mvtec_categories(data, categories)
    if cats is None:
        if not data.is_dir():
            raise PatchCoreError(f"{data} is not a folder of images")
        if out.suffix != ".safetensors":
            out = out / f"{data.resolve().name}.safetensors"
        targets = [(out.stem, data, out)]  # the name of the file written
    else:
        many = len(cats) > 1 or out.suffix != ".safetensors"
        targets = [(n, d / "train" / "good", out / f"{n}.safetensors" if many else out)
                   for n, d in cats]
    for _, folder, _ in targets:
        if not folder.is_dir():
            raise PatchCoreError(f"training folder {folder} does not exist")
    check_outputs(option, given, [t[2] for t in targets], [t[1] for t in targets],
                  [weights] if weights else [])
    return targets
