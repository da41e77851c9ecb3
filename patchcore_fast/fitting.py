"""Fitting a model's memory bank (steps 1-7), at one or several coreset ratios.

:func:`fit_ratios` is the one fit path of :class:`~patchcore_fast.model.PatchCore`'s
``fit`` and ``fit_each_ratio``: the training features are embedded once (to a temporary
file or memory, their projections in memory), then per ratio the greedy coreset is
selected, its rows gathered and their neighbors precomputed; under torch.distributed the
ranks share the images (:mod:`~patchcore_fast.sharded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed
from .coreset import StreamingCoreset, coreset_size
from .errors import PatchCoreError
from .sharded import TrainingRows
from .verdict import ImageRows, calibrate

if TYPE_CHECKING:  # the model imports this module
    from .model import PatchCore

__all__ = ["fit_ratios", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it times the work.

    CUDA kernels run asynchronously: without this, a timer stops when the launches are
    queued (a 20,071-point coreset "took" 8 ms). A no-op on the CPU.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_ratios(model: "PatchCore", paths: list[Path], ratios: Sequence[float],
               skipped: list[str] | None, progress: bool, streaming: bool,
               temp_dir: str | os.PathLike | None, false_reject_rate: float | None = None
               ) -> Iterator[float]:
    """The one fit path: embed every training image once, then per ratio select the
    coreset, gather its rows and precompute their neighbors (``model._set_bank``); yields
    each ratio once the model holds its bank."""
    if not len(ratios):
        raise PatchCoreError("no coreset ratio given: give at least one, in (0, 1]")
    for r in ratios:
        coreset_size(1, r)  # validates every ratio before any work
    # Under torch.distributed each rank embeds its contiguous share of the images and
    # the coreset runs on the shards (sharded.py); rank 0 ends with the bank.
    launch = distributed.current()
    paths = launch.share(paths)
    progress = progress and launch.is_main
    c = model.config
    t0 = time.perf_counter()
    n_images = 0
    fixed = model.preprocess.fixed_input
    layout = ImageRows()  # which rows, grid and input size each image has
    # One process projects its rows as they come (the global blocks from row 0); the
    # ranks of a distributed run project theirs in the same blocks afterwards.
    with contextlib.ExitStack() as held:
        sc = held.enter_context(StreamingCoreset(
            ratios[0], c.projection_dim, c.seed, temp_dir=temp_dir, in_memory=not streaming,
            project=launch.world == 1))
        # Pass 1: features -> temporary file (or memory) + projections in memory.
        for batch, patches, sizes in model._embed_paths(paths, skipped, progress,
                                                       "fit: features"):
            if fixed and sc.expected_rows is None:
                # A fixed input shape gives every image the first one's grid, so this
                # bounds N (skipped files only lower it) and the projected bank is
                # allocated once. Without it (shorter, no crop) grids follow each
                # photo's aspect: an elongated first photo would over-allocate, a
                # square one under-allocate, so the bank grows block by block.
                sc.expected_rows = len(paths) * patches.shape[1]
            layout.add(batch, sc.n, patches.shape[1], model.grid, model.input_size, sizes)
            sc.add(patches.reshape(-1, patches.shape[-1]))
            n_images += len(batch)
        rows = TrainingRows(sc, launch, n_images, model.grid, model.device)
        model.grid = rows.grid
        synchronize(model.device)
        feature_seconds = time.perf_counter() - t0
        # The calibration sees every training row and image as one process does. Under
        # torchrun that costs a transfer: every rank's full-width features travel to
        # rank 0 (N x D floats, into a temporary file there), which projects them again
        # and calibrates alone while the other ranks wait at the coreset's first
        # collective; the calibration (folds, fold banks, out-of-sample scores,
        # thresholds) is then the one-process fit's (sharded.TrainingRows.everything).
        everything = None
        if false_reject_rate is not None:
            everything = rows.everything(layout)  # collective; None on ranks > 0
            if everything is not None and everything[0] is not sc:
                held.enter_context(everything[0])
        gather_seconds = time.perf_counter() - t0 - feature_seconds
        # Pass 2, per ratio: the greedy selection on the projections (kept for the
        # next ratio unless this is the last), then the chosen rows (on rank 0).
        for j, ratio in enumerate(ratios):
            last = j == len(ratios) - 1
            t1 = time.perf_counter()
            if everything is not None:
                model.calibration = calibrate(model, *everything, ratio, false_reject_rate,
                                              progress)
                model.fit_stats["calibration_seconds"] = (gather_seconds +
                                                          time.perf_counter() - t1)
            t_select = time.perf_counter()
            with torch.inference_mode(), tqdm(total=2, desc="fit: coreset and gather",
                                              disable=not progress, leave=False) as bar:
                idx = rows.select(ratio, keep_projections=not last)
                bar.update()
                bank = rows.gather(idx)
                bar.update()
            synchronize(model.device)  # CUDA work is asynchronous: time it finished
            t2 = time.perf_counter()
            if ratio != model.config.coreset_ratio:
                model.config = dataclasses.replace(model.config, coreset_ratio=ratio)
            if bank is not None:  # None on the other ranks of a distributed fit
                model._set_bank(bank.contiguous(), progress)
            model.fit_stats.update(patches=rows.n, images=rows.images,
                                   feature_seconds=feature_seconds,
                                   coreset_seconds=t2 - t_select, streaming=streaming,
                                   **rows.record)
            model.fit_stats["fit_seconds"] = (feature_seconds + gather_seconds +
                                              time.perf_counter() - t1)
            yield ratio
