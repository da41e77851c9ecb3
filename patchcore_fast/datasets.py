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

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import InputWarning, LargeImageWarning, PatchCoreError, SkippedFileWarning
from .files import check_outputs, file_problem, text_name
from .geometry import Preprocess
from .images import (IMAGE_EXTENSIONS, UnreadableImage, read_image, unsupported_format,
                     unsupported_message)


def warn_skipped(path: str | os.PathLike, why: str) -> None:
    """Warn that a file is left out (one line naming it)."""
    warnings.warn(f"skipping {text_name(path)}: {why}", SkippedFileWarning, stacklevel=2)


def skip_file(path: str | os.PathLike, why: str, skipped: list[str] | None) -> None:
    """Warn that a file is left out (:func:`warn_skipped`) and append it to ``skipped``."""
    warn_skipped(path, why)
    if skipped is not None:
        skipped.append(text_name(path))


def _folder_images(folder: Path, what: str, skipped: list[str] | None) -> list[Path]:
    """The image files of one folder, sorted by name; every other entry named in a warning
    and skipped (sub-folders and hidden files are not read)."""
    images = []
    for f in sorted(f for f in folder.iterdir() if not f.name.startswith(".")):
        why = file_problem(f)
        if why == "is a folder":
            continue
        if why:  # a dangling link, a loop of links, a pipe, a device, a socket
            skip_file(f, why.removeprefix("is "), skipped)
        elif f.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(f)
        elif fmt := unsupported_format(f):
            skip_file(f, unsupported_message(fmt), skipped)
        else:
            skip_file(f, f"not an image file (extension {f.suffix or 'none'})", skipped)
    if not images:
        raise PatchCoreError(f"{what} {text_name(folder)} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    return images


def list_images(inputs: Sequence[str | os.PathLike], what: str = "input",
                skipped: list[str] | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of image files, each once.

    Inside a folder, every entry left out is warned about, naming it, and appended to
    ``skipped``: files with an extension that is not an image's, images in formats this
    tool does not read (GIF, WebP, ...), dangling symbolic links and loops of them,
    devices, pipes and sockets (also when named on the command line). Hidden files and
    sub-folders are ignored (folders are not searched recursively). An image given more
    than once (the same file after links and ``..``: ``a.png ./a.png``, or a folder and a
    file in it) is listed once, with a warning; a file name that is not UTF-8 is named in
    a warning with the text the outputs give it (:func:`~patchcore_fast.files.text_name`).

    Args:
        inputs: image files and/or folders.
        what: what the inputs are, for messages (e.g. ``"training folder"``).
        skipped: list that collects the paths left out.

    Returns:
        list of paths in the given order, folder contents sorted by name.
    """
    if not inputs:
        raise PatchCoreError(f"no {what} given")
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        why = file_problem(p)
        if why == "is a folder":
            found.extend(_folder_images(p, what, skipped))
        elif why and not why.endswith("not a regular file"):  # missing, a link to nowhere
            raise PatchCoreError(f"{what} {text_name(p)} {why}")
        elif why:  # a pipe (reading it would wait for a writer), a device, a socket
            skip_file(p, why.removeprefix("is "), skipped)
        elif fmt := unsupported_format(p):
            skip_file(p, unsupported_message(fmt), skipped)
        else:
            found.append(p)
    return _once(found)


def _once(paths: list[Path]) -> list[Path]:
    """Each file once (the first spelling of it), warning about repeats and about names
    that are not UTF-8."""
    seen: dict[str, list[Path]] = {}
    for p in paths:
        seen.setdefault(os.path.realpath(p), []).append(p)
    for spellings in seen.values():
        if len(spellings) > 1:
            warnings.warn(f"{text_name(spellings[0])} is given {len(spellings)} times: it is "
                          f"read once", InputWarning, stacklevel=3)
        name = text_name(spellings[0])
        if name != str(spellings[0]):
            warnings.warn(f"the name of {name} is not valid UTF-8: the outputs write each "
                          f"such byte as \\xNN, as here", InputWarning, stacklevel=3)
    return [spellings[0] for spellings in seen.values()]


class ImageFiles(Dataset):
    """Images of a list of files, preprocessed; unreadable files give ``None``.

    Args:
        paths: image files.
        preprocess: geometry and normalisation.
        photos: each item also carries the photo's pixels as read (for overlays drawn
            without reading the file again).
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, photos: bool = False):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.photos = photos

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None, str | None,
                                           tuple[int, int], np.ndarray | None]:
        """(index, Tensor[3, H_in, W_in] or None, why it was skipped, a note to warn, the
        photo's (width, height) upright: the size its map is put back to, and with
        ``photos`` its pixels: uint8 array[H, W, 3] upright, else None).

        The pixels are a numpy array, not a tensor: a CUDA run's loader pins its tensors
        (``pin_memory``), and only the model's input goes to the device.
        """
        try:
            img = read_image(self.paths[i])
            return (i, self.preprocess.image(img), None, self.preprocess.oversize(img.size),
                    img.size, np.asarray(img) if self.photos else None)
        except UnreadableImage as exc:
            return i, None, str(exc), None, (0, 0), None


def _collate(items: list) -> tuple[list[tuple[list[int], Tensor, list[tuple[int, int]],
                                               list[np.ndarray | None]]],
                                   list[tuple[int, str]], list[tuple[int, str]]]:
    """Readable images stacked by input shape (one group unless ``shorter`` without a crop
    met photos of different aspect) with their sizes and pixels (None without
    ``photos``), unreadable ones, warnings."""
    groups: dict[tuple[int, ...], list[tuple]] = {}
    for i, x, _, _, size, photo in items:
        if x is not None:
            groups.setdefault(tuple(x.shape), []).append((i, x, size, photo))
    bad = [(i, why) for i, x, why, _, _, _ in items if x is None]
    notes = [(i, note) for i, _, _, note, _, _ in items if note]
    stacks = [([i for i, _, _, _ in g], torch.stack([x for _, x, _, _ in g]),
               [s for _, _, s, _ in g], [p for _, _, _, p in g]) for g in groups.values()]
    return stacks, bad, notes


def reader_processes(asked: int) -> int:
    """``num_workers`` (``--workers``) capped at the CPUs this process may use, with a
    warning when it is: each worker is a process holding its own copy of the reading
    state, and more of them than CPUs only costs memory (64 on 2 cores: 64 processes)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    if asked > cpus:
        warnings.warn(f"--workers {asked}: capped at {cpus}, the CPUs this process may use",
                      InputWarning, stacklevel=3)
        return cpus
    return asked


def iterate_images(paths: Sequence[Path], preprocess: Preprocess, batch_size: int = 8,
                   num_workers: int = 0, skipped: list[str] | None = None,
                   progress: Callable[[int], None] | None = None, pin_memory: bool = False,
                   photos: bool = False) -> Iterator[tuple]:
    """Batches of preprocessed images; unreadable files are skipped with a warning.

    Each image is read once (:func:`~patchcore_fast.images.read_image`), and its upright
    size comes with its pixels: the map is put back to the size of the pixels the model
    saw, never to a size read again from the file.

    Args:
        paths: image files.
        preprocess: geometry and normalisation.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 reads in this process), at most the
            CPUs available (:func:`reader_processes`).
        skipped: list collecting the paths left out.
        progress: called with the number of files handled after each batch.
        pin_memory: put batches in page-locked memory (for a CUDA model: the copy to the
            GPU is then asynchronous, ``non_blocking=True``).
        photos: also yield each photo's pixels as read (uint8 array[H, W, 3] upright):
            what an overlay is drawn on, without decoding the file a second time.

    Yields:
        (indices into ``paths``, Tensor[B, 3, H_in, W_in], (width, height) of each photo),
        with ``photos`` and a list of their pixels, for batches with readable images; a
        batch whose images differ in input shape comes as one batch per shape.
    """
    loader = DataLoader(ImageFiles(paths, preprocess, photos), batch_size=batch_size,
                        num_workers=reader_processes(num_workers), collate_fn=_collate,
                        shuffle=False, pin_memory=pin_memory)
    for stacks, bad, notes in loader:
        # Warned here, in the main process (the readers may be worker processes).
        for i, note in notes:
            warnings.warn(f"{paths[i]}: {note}", LargeImageWarning, stacklevel=2)
        for i, why in bad:
            skip_file(paths[i], why, skipped)
        if progress is not None:
            progress(sum(len(stack[0]) for stack in stacks) + len(bad))
        for stack in stacks:
            yield stack if photos else stack[:3]


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


#: What makes a folder an MVTec-style category, by what the verb reads: fit and study
#: its good training images, evaluate only its test images (``train/`` may be absent).
TRAIN, TEST = "train/good", "test"


def is_mvtec_category(path: Path, part: str = TRAIN) -> bool:
    """True if ``path`` is an MVTec-style category folder: it has ``part`` (:data:`TRAIN`
    or :data:`TEST`, the part the verb reads)."""
    return (path / part).is_dir()


def find_categories(root: str | os.PathLike, part: str = TRAIN) -> list[str]:
    """Names of the MVTec-style categories under ``root`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise PatchCoreError(f"data folder {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_mvtec_category(p, part))


def resolve_categories(root: str | os.PathLike, categories: Sequence[str],
                       part: str = TRAIN) -> list[tuple[str, Path]]:
    """(name, folder) of each requested category under ``root``; ``all`` means every
    category found (:func:`mvtec_categories` handles a data path without categories)."""
    root = Path(root)
    if list(categories) == ["all"]:
        names = find_categories(root, part)
        if not names:
            raise PatchCoreError(f"no MVTec-style categories (<name>/{part}) in {root}")
        return [(n, root / n) for n in names]
    out = []
    for name in categories:
        folder = root / name
        if not is_mvtec_category(folder, part):
            found = find_categories(root, part)
            hint = f"; found: {', '.join(found)}" if found else ""
            raise PatchCoreError(f"no category {name!r} in {root} (expected "
                                 f"{folder}/{part}){hint}")
        out.append((name, folder))
    return out


def mvtec_categories(data: Path, category: Sequence[str] | None, part: str = TRAIN
                     ) -> list[tuple[str, Path]] | None:
    """(name, folder) of the MVTec-style categories that a data path and ``--category``
    name (a category has ``part``: :data:`TRAIN` for fit and study, :data:`TEST` for
    evaluate); None when the path is neither a data set root with categories nor a
    category folder itself."""
    if not data.exists():
        raise PatchCoreError(f"data folder {data} does not exist")
    if category:
        return resolve_categories(data, category, part)
    if is_mvtec_category(data, part):
        return [(data.name, data)]
    return None


def _no_mask(image: Path, where: Path) -> None:
    """Warn that a defective image has no mask (it is left out of the pixel metrics)."""
    warnings.warn(f"no mask for {text_name(image)} in {text_name(where)}: it is left out of "
                  f"the pixel metrics", InputWarning, stacklevel=3)


def mvtec_test(category_dir: Path, skipped: list[str] | None = None) -> list[TestImage]:
    """Test images of an MVTec-style category with labels, defect types and masks.

    When the category has a ``ground_truth`` folder, a defective image without a mask
    there is named in a warning (:class:`~patchcore_fast.errors.InputWarning`).
    """
    test = category_dir / TEST
    if not test.is_dir():
        raise PatchCoreError(f"{category_dir} has no test folder")
    has_masks = (category_dir / "ground_truth").is_dir()
    items = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        label = 0 if sub.name == "good" else 1
        gt = category_dir / "ground_truth" / sub.name
        for path in list_images([sub], "test folder", skipped):
            mask = _find_mask(gt, path.stem) if label else None
            if label and mask is None and has_masks:
                _no_mask(path, gt)
            items.append(TestImage(path, label, text_name(sub.name), mask))
    if not items:
        raise PatchCoreError(f"{test} holds no test images")
    return items


def _overlap(good: Path, defective: Path, masks: Path | None) -> str | None:
    """What is wrong when the folders of the folder layout overlap, or None.

    The defective folder's sub-folders are defect types, and a mask folder's files are
    masks: a good folder equal to the defective one or inside it would be labelled
    defective too, and a mask folder equal to or inside either would make images their
    own masks (or a defect type of masks).
    """
    g, d = good.resolve(), defective.resolve()
    if g == d:
        return (f"--good {good} and --defective {defective} are the same folder: every image "
                f"would be good and defective; give two folders")
    if g.is_relative_to(d):
        return (f"--good {good} is inside --defective {defective}, whose sub-folders are "
                f"defect types: its images would be labelled defective; move it out")
    if masks is not None:
        m = masks.resolve()
        for option, folder in (("--defective", d), ("--good", g)):
            if m == folder or m.is_relative_to(folder):
                return (f"--masks {masks} is {'' if m == folder else 'inside '}the "
                        f"{option} folder: images would be their own masks; give the "
                        f"masks a folder of their own")
    return None


def folder_test(good: str | os.PathLike, defective: str | os.PathLike,
                masks: str | os.PathLike | None = None,
                skipped: list[str] | None = None) -> list[TestImage]:
    """Evaluation images from plain folders (anomalib's Folder layout).

    Refused in one line: folders that overlap (:func:`_overlap`), and one image (the same
    file after links) among both the good and the defective ones. With ``masks``, a
    defective image without a mask is named in a warning.

    Args:
        good: folder of good images.
        defective: folder of defective images, or of one sub-folder per defect type.
        masks: folder of masks named like the images (optionally with ``_mask``), with the
            same sub-folders as ``defective``; None when there are no masks.
        skipped: list collecting the paths left out.

    Returns:
        list of :class:`TestImage`.
    """
    defective = Path(defective)
    if not defective.is_dir():
        raise PatchCoreError(f"defective folder {defective} does not exist")
    problem = _overlap(Path(good), defective, Path(masks) if masks is not None else None)
    if problem:
        raise PatchCoreError(problem)
    items = [TestImage(p, 0, "good", None) for p in list_images([good], "good folder", skipped)]
    good_files = {os.path.realpath(i.path): i.path for i in items}
    subs = sorted(p for p in defective.iterdir() if p.is_dir())
    groups = [(s.name, s) for s in subs] if subs else [("defective", defective)]
    for name, folder in groups:
        mask_dir = None
        if masks is not None:
            mask_dir = Path(masks) / name if subs else Path(masks)
            if not mask_dir.is_dir():
                raise PatchCoreError(f"mask folder {mask_dir} does not exist")
        for path in list_images([folder], "defective folder", skipped):
            same = good_files.get(os.path.realpath(path))
            if same is not None:
                raise PatchCoreError(f"{text_name(path)} is the good image {text_name(same)} "
                                     f"too: an image is good or defective, not both")
            mask = _find_mask(mask_dir, path.stem) if mask_dir else None
            if mask_dir is not None and mask is None:
                _no_mask(path, mask_dir)
            items.append(TestImage(path, 1, text_name(name), mask))
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
