"""Calibrating and extending a fitted model, and the verdict of its maps.

:func:`calibrate` sets a model's thresholds at fit (out-of-sample scores of the training
images by cross-fitting, :mod:`~patchcore_fast.calibration`); :func:`update` adds good
images to a fitted model without refitting it, extending its calibration; :func:`verdict`
turns scores and maps into normalised scores, labels and defect regions.
:class:`~patchcore_fast.model.PatchCore` delegates its ``update`` and ``verdict`` here.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import calibration
from .calibration import Calibration
from .coreset import (StreamingCoreset, continue_coreset, coreset_size,
                      coreset_start_and_projection, distance_to_chosen, project_rows)
from .errors import PatchCoreError
from .regions import DEFAULT_MIN_REGION_AREA, find_regions
from .scoring import NeighborsOnDemand, score_patches, update_neighbors

if TYPE_CHECKING:  # the model imports this module
    from .model import PatchCore

__all__ = ["ImageRows", "calibrate", "update", "verdict"]


class ImageRows:
    """Which bank rows, feature grid, input size and photo size each training image has
    (in order)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.spans: list[tuple[int, int]] = []
        self.shapes: list[tuple[tuple[int, int], tuple[int, int]]] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) of each photo as read

    def add(self, paths: Sequence[Path], start: int, per_image: int,
            grid: tuple[int, int], size: tuple[int, int],
            sizes: Sequence[tuple[int, int]]) -> None:
        for j, p in enumerate(paths):
            self.paths.append(p)
            self.spans.append((start + j * per_image, start + (j + 1) * per_image))
            self.shapes.append((tuple(grid), tuple(size)))
            self.sizes.append(tuple(sizes[j]))

    @classmethod
    def joined(cls, parts: Sequence["ImageRows"], starts: Sequence[int]) -> "ImageRows":
        """The layouts of consecutive runs of rows as one: part r's rows start at global
        row ``starts[r]`` (a distributed fit's ranks, in rank order)."""
        out = cls()
        for part, start in zip(parts, starts):
            out.paths += part.paths
            out.spans += [(start + a, start + b) for a, b in part.spans]
            out.shapes += part.shapes
            out.sizes += part.sizes
        return out

    def scored(self, model: "PatchCore", sc: StreamingCoreset, held: Sequence[int],
               bank: Tensor, hood: Tensor | None) -> Iterator[tuple]:
        """The held-out images ``held`` scored against ``bank`` from their stored rows
        (no features extracted again), batch by batch as
        :func:`~patchcore_fast.calibration.out_of_sample` takes them: (image indices,
        scores, maps at each photo's size as it was read)."""
        c = model.config
        for ids in self.batches(held, c.batch_size):
            patches = sc.gather(calibration.rows_of_images(self.spans, ids)).view(
                len(ids), -1, sc.dim)
            grid, size = self.shapes[ids[0]]
            scores, maps = score_patches(patches, bank, hood, grid, size, c.blur_sigma)
            yield ids, scores.cpu().numpy(), model.maps_back(
                [self.paths[i] for i in ids], maps.cpu(), sizes=[self.sizes[i] for i in ids])

    def batches(self, ids: Sequence[int], size: int) -> Iterator[list[int]]:
        """``ids`` in runs of at most ``size`` images of one shape."""
        run: list[int] = []
        for i in ids:
            if run and (len(run) == size or self.shapes[i] != self.shapes[run[0]]):
                yield run
                run = []
            run.append(int(i))
        if run:
            yield run


def calibrate(model: "PatchCore", sc: StreamingCoreset, layout: ImageRows, ratio: float,
              rate: float, progress: bool) -> Calibration | None:
    """The calibration at fit: out-of-sample scores of the training images by 5-fold
    cross-fitting, and the thresholds from them (:mod:`~patchcore_fast.calibration`);
    None (with a warning) when there are fewer than 2 images.

    Args:
        sc: every training row, projected as one process projects them (a distributed
            fit's, gathered on rank 0: :meth:`~patchcore_fast.sharded.TrainingRows.everything`).
        layout: every training image's rows and shapes, in the fit's image order.
    """
    n = len(layout.paths)
    if n < 2:
        warnings.warn(f"no calibrated threshold: {n} good image cannot be scored out of "
                      f"sample (score with --threshold)", RuntimeWarning, stacklevel=3)
        return None
    c = model.config
    scheme, folds = calibration.DEFAULT_SCHEME, calibration.DEFAULT_FOLDS
    held_out = calibration.split_images(n, scheme, folds, seed=c.seed)

    def scored(held: np.ndarray, bank: Tensor):
        # A fold's bank scores its held-out images and is dropped: the neighbors of the
        # rows they read only (one per image), not the fold bank's whole table.
        hood = NeighborsOnDemand(bank, c.num_neighbors) if c.num_neighbors > 0 else None
        for batch in layout.scored(model, sc, held, bank, hood):
            bar.update(len(batch[0]))
            yield batch

    with torch.inference_mode(), tqdm(total=n, desc="fit: calibration", unit="img",
                                      disable=not progress, leave=False) as bar:
        banks = calibration.fold_banks(sc.projected(), sc.gather, layout.spans,
                                       held_out, ratio, c.seed)
        oos = calibration.out_of_sample(n, ((h, scored(h, b)) for h, b in banks))
    return oos.calibration(rate, scheme, len(held_out))


def update(model: "PatchCore", paths: list[Path], skipped: list[str] | None = None,
           progress: bool = False) -> "PatchCore":
    """Add good images to a fitted model without refitting it.

    The greedy k-center selection continues from the bank
    (:func:`~patchcore_fast.coreset.continue_coreset`: the bank rows are centres
    already chosen, in the selection's projection, and the selection goes on over the
    new images' patches), adding ``coreset_ratio`` of their patches as new rows after
    the old ones, which are kept as they are; the neighbors are updated for the new
    rows only (:func:`~patchcore_fast.scoring.update_neighbors`). The calibration is
    extended with the new images' out-of-sample scores, by cross-fitting among them
    (each fold scored against the old bank plus a continuation over the other new
    folds) and the thresholds recomputed at the model's target rate; the colour
    scale's bottom (the median good pixel) is kept. The cost grows with the new images
    (one k-NN pass of their patches against the bank aside). ``fit_stats["updates"]``
    records what was added.

    Args:
        images: good image files and/or folders.
        skipped: list collecting unreadable files.
        progress: show progress bars.

    Returns:
        model.
    """

    model._check_fitted()
    if not isinstance(model.bank, Tensor):
        raise PatchCoreError("a sharded bank cannot be updated; load the model in one "
                             "process")
    c = model.config
    t0 = time.perf_counter()
    old_bank, old_hood = model.bank, model.neighbors
    layout = ImageRows()
    with StreamingCoreset(c.coreset_ratio, c.projection_dim, c.seed,
                          in_memory=True) as sc:
        for batch, patches, sizes in model._embed_paths(paths, skipped,
                                                    progress, "update: features"):
            layout.add(batch, sc.n, patches.shape[1], model.grid, model.input_size, sizes)
            sc.add(patches.reshape(-1, patches.shape[-1]))
        if sc.n == 0:
            raise PatchCoreError("none of the new images could be read")
        with torch.inference_mode():
            _, proj = coreset_start_and_projection(None, old_bank.shape[1],
                                                   c.projection_dim, c.seed)
            proj = proj.to(old_bank.device) if proj is not None else None
            chosen = torch.cat([project_rows(old_bank[r:r + 8192], proj)
                                for r in range(0, old_bank.shape[0], 8192)])
            new_proj = sc.projected()
            # The one pass against the old bank, shared by every continuation below (the
            # calibration's folds and the update itself): each new row's distance to its
            # nearest old centre.
            start = distance_to_chosen(chosen, new_proj)

            def extended(rows: Tensor, kept: bool = False
                         ) -> tuple[Tensor, Tensor | NeighborsOnDemand | None, int]:
                """The old bank plus the continuation over ``rows`` of the new ones, with
                its neighbors: the whole table for the bank ``kept`` (the model's), else
                those of the rows read (a calibration fold's, dropped once scored)."""
                k = coreset_size(len(rows), c.coreset_ratio)
                pick = continue_coreset(chosen, new_proj[rows], k, start[rows])
                bank = torch.cat([old_bank, sc.gather(rows[pick])])
                if old_hood is None:
                    return bank, None, k
                return bank, (update_neighbors(bank, old_hood, k, c.num_neighbors) if kept
                              else NeighborsOnDemand(bank, c.num_neighbors)), k

            if model.calibration is not None:
                model.calibration = _update_calibration(model, sc, layout, extended)
            bank, hood, added = extended(torch.arange(sc.n), kept=True)
    model.bank, model.neighbors = bank.contiguous(), hood
    model.fit_stats.setdefault("updates", []).append(
        {"images": len(layout.paths), "patches": sc.n, "rows_added": added,
         "bank_rows_before": int(old_bank.shape[0]),
         "seconds": time.perf_counter() - t0})
    model.fit_stats.update(bank_rows=int(model.bank.shape[0]))
    return model



def _update_calibration(model: "PatchCore", sc: StreamingCoreset, layout: ImageRows,
                        extended) -> Calibration:
    """The calibration extended with the new images' out-of-sample statistics."""
    c, cal = model.config, model.calibration
    n = len(layout.paths)
    held_out = (calibration.split_images(n, "crossfit", calibration.DEFAULT_FOLDS,
                                         seed=c.seed) if n >= 2 else [np.array([0])])

    def scored(held: np.ndarray):
        others = np.setdiff1d(np.arange(n), held)
        if others.size:
            bank, hood, _ = extended(calibration.rows_of_images(layout.spans, others))
        else:  # one new image: scored against the old bank
            bank, hood = model.bank, model.neighbors
        return layout.scored(model, sc, held, bank, hood)

    oos = calibration.out_of_sample(n, ((h, scored(h)) for h in held_out))
    return calibration.calibrate(
        [*cal.image_scores, *oos.scores], [*cal.image_peaks, *oos.peaks], cal.colour_min,
        cal.false_reject_rate, cal.scheme, cal.folds, cal.pixel_quantiles)



def verdict(model: "PatchCore", scores: np.ndarray, maps: Sequence[np.ndarray],
            min_region_area: int = DEFAULT_MIN_REGION_AREA
            ) -> tuple[np.ndarray, np.ndarray, list[list[dict]], list[np.ndarray]]:
    """The calibrated verdict on scored images (the model must be calibrated).

    Args:
        scores (float array[B]): raw image scores.
        maps: their anomaly maps.
        min_region_area: regions of fewer pixels are left out.

    Returns:
        (normalised scores, labels (True = defective), regions per image, region
        masks per image: bool arrays of the maps' shapes).
    """
    cal = model.calibration
    if cal is None:
        raise PatchCoreError("the model has no calibrated threshold: refit it with "
                             "this version, or give a threshold")
    found = [find_regions(m, cal.pixel_threshold, min_region_area) for m in maps]
    return (calibration.normalise(np.asarray(scores, dtype=np.float64), cal),
            calibration.label(np.asarray(scores, dtype=np.float64), cal),
            [r for r, _ in found], [m for _, m in found])

# ----- model file -----------------------------------------------------------------
