"""Running a fitted model over image sets: the loops of evaluate and study (score's is
:mod:`~patchcore_fast.score_run`).

Both keep their memory bounded whatever the number of images: maps are counted into
per-defect pixel histograms (:class:`~patchcore_fast.metrics.PixelHistogram`: pixel AUROC,
PRO, the overlays' colour scale) and parked in a temporary file for the overlays
(:func:`~patchcore_fast.overlays.write_map_files`); no array of all maps or masks is built.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import distributed, metrics
from .config import PatchCoreConfig
from .datasets import TEST, TestImage, folder_test, mvtec_categories, mvtec_test, skip_file
from .errors import PatchCoreError
from .files import ArraySpool, MapSpool, check_outputs, file_problem, text_name
from .images import UnreadableImage, image_size, read_mask, read_size_again
from .calibration import label
from .metrics import PixelHistogram
from .regions import RegionCounts, find_regions
from .model import PatchCore
from .outputs import evaluation_files, evaluation_names, summary_files, write_evaluation
from .overlays import write_map_files
from .score_run import shares
from .sharded import ShardedBank


# ----- test images and their masks --------------------------------------------------------

def evaluation_sets(model: str | Path, data: str | Path | None, categories: Sequence[str] | None,
                    good: str | None = None, defective: str | None = None,
                    masks: str | None = None
                    ) -> list[tuple[str, Path, list[TestImage], list[str], list[Path]]]:
    """What evaluate runs over: (name, model file, test images, skipped, the folders whose
    listing makes the set) per category.

    A category of the MVTec layout is a folder with ``test/`` (evaluate never reads
    ``train/``); the folders listed are its ``test`` and ``ground_truth`` (a new folder in
    either would be a new defect type), or ``--good``, ``--defective`` and ``--masks``.

    Args:
        model: a model file, or the folder of ``<category>.safetensors`` files.
        data: an MVTec-style root or category folder (or None with the folder layout).
        categories: the categories under ``data`` (several, or ``all``).
        good, defective, masks: the folder layout instead of MVTec's.
    """
    model = Path(model)
    if good or defective:
        if not (good and defective):
            raise PatchCoreError("the folder layout needs both --good and --defective")
        skipped: list[str] = []
        items = folder_test(good, defective, masks, skipped)
        listed = [Path(good), Path(defective), *([Path(masks)] if masks else [])]
        return [(model.stem, model, items, skipped, listed)]
    if not data:
        raise PatchCoreError("give DATA (MVTec-style) or --good and --defective folders")
    data = Path(data)
    cats = mvtec_categories(data, categories, TEST)
    if cats is None:
        raise PatchCoreError(f"{data} is not an MVTec-style category (no test folder); give "
                             f"--category, or --good and --defective folders")
    out = []
    for name, folder in cats:
        skipped = []
        items = mvtec_test(folder, skipped)
        file = model / f"{name}.safetensors" if model.is_dir() else model
        if len(cats) > 1 and not model.is_dir():
            raise PatchCoreError(f"several categories need MODEL to be the folder of "
                                 f"<category>.safetensors files, got {model}")
        out.append((name, file, items, skipped, [folder / TEST, folder / "ground_truth"]))
    return out


def check_evaluation_outputs(option: str, out: Path, sets: Sequence, overlays: bool,
                             save_maps: bool, weights: str | None = None,
                             overlay_format: str = "png") -> None:
    """Check evaluate's model files and every output path before any work.

    Args:
        option: the output option, for messages.
        out: output folder (one sub-folder per category when there are several).
        sets: :func:`evaluation_sets`' answer.
        overlays, save_maps: which image files will be written.
        weights: the ``--weights`` file, if any (read, so never overwritten).
        overlay_format: ``png`` or ``jpg``.
    """
    for name, file, items, _, listed in sets:
        why = file_problem(file)
        if why:
            raise PatchCoreError(f"model file {file} {why}")
        many = len(sets) > 1
        check_outputs(option, out, evaluation_files(out / name if many else out, items,
                                                    overlays, save_maps, overlay_format)
                      + (summary_files(out) if many else []),
                      {*listed, *(p.parent for i in items for p in (i.path, i.mask)
                                  if p is not None)},
                      [file, *([weights] if weights else [])])


def usable_masks(items: Sequence[TestImage], skipped: list[str]) -> list[TestImage]:
    """The test images whose mask (if any) is readable and as large as the image.

    A mask of another size cannot be aligned with its image (resizing it would move the
    defect), so the image is left out with a warning naming both files, like an unreadable
    one (or, with ``--on-error fail``, the run stops).
    """
    out = []
    for i in items:
        if i.mask is not None:
            try:
                mask_wh = image_size(i.mask)
                why = None
                try:
                    image_wh = image_size(i.path)
                except UnreadableImage:
                    image_wh = None  # the image itself is reported when it is read
                if image_wh is not None and mask_wh != image_wh:
                    why = (f"its mask {i.mask} is {mask_wh[0]} x {mask_wh[1]}, the image "
                           f"{image_wh[0]} x {image_wh[1]}")
            except UnreadableImage as exc:
                why = f"its mask {i.mask} cannot be read ({exc})"
            if why is not None:
                skip_file(i.path, why, skipped)
                continue
        out.append(i)
    return out


def mask_of(item: TestImage, preprocess, maps_at: str = "original",
            size: tuple[int, int] | None = None) -> np.ndarray:
    """Ground truth of one test image (all False without a mask), matching its map.

    Args:
        item: the test image.
        preprocess (geometry.Preprocess): the model's geometry.
        maps_at: ``original``: the mask itself (the photo's size); ``crop``: put through
            the model's geometry and cut to the pixels that show the photo.
        size: the photo's (width, height) as it was read (needed without a mask; default:
            its header).

    Returns:
        bool array[H, W] (:func:`~patchcore_fast.images.read_mask` says what a mask is).
    """
    m = None
    if item.mask:
        try:
            m = read_mask(item.mask)
        except UnreadableImage as exc:
            raise PatchCoreError(f"cannot read mask {item.mask}: {exc}") from None
        size = m.size
    elif size is None:
        size = read_size_again(item.path)
    if maps_at == "crop":
        return preprocess.mask(m, size).numpy()
    if m is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    return np.asarray(m) > 0


def add_maps(pixels: dict[str, PixelHistogram], defects: Sequence[str],
             maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> None:
    """Count each map's pixels into the histogram of its defect type.

    Args:
        pixels: histogram per defect type (created on first use).
        defects: defect type of each map (``good`` for good images).
        maps: anomaly maps (float32 arrays[H, W], any sizes).
        masks: ground truth of each map (bool array of its shape, or None: all normal).
    """
    for defect, amap, mask in zip(defects, maps, masks):
        pixels.setdefault(defect, PixelHistogram()).add(amap, mask)


def has_ground_truth(items: Sequence[TestImage]) -> bool:
    """Pixel metrics are taken when some defective image has a mask: over the good images
    (all normal) and the defective ones that have masks; a defective image without one is
    left out of them (:func:`in_pixel_metrics`), named in a warning when it is listed."""
    return any(i.mask for i in items if i.label)


#: The histogram key of the defective images without masks (no folder has this name).
NO_MASK = "\0without a mask"


def in_pixel_metrics(item: TestImage) -> bool:
    """Whether an image's pixels count in the pixel metrics: good, or with a mask."""
    return not item.label or item.mask is not None


def _metrics(items: Sequence[TestImage], scores: np.ndarray,
             pixels: dict[str, PixelHistogram]) -> dict:
    truth = has_ground_truth(items)
    pixels = {k: h for k, h in pixels.items() if k != NO_MASK}
    result = metrics.evaluate([i.label for i in items], scores, [i.defect for i in items],
                              pixels=pixels if truth else None)
    result["ground_truth"] = {
        "masks": sum(1 for i in items if i.label and i.mask),
        "missing": [text_name(i.path) for i in items if i.label and not i.mask],
        "defect_pixels": sum(h.defect_pixels for h in pixels.values()) if truth else 0}
    return result


# ----- the loops ----------------------------------------------------------------------------

def _evaluate_pass(model: PatchCore, items: Sequence[TestImage], skipped: list[str],
                   spool: MapSpool | None, progress: bool, maps_at: str = "original"
                   ) -> tuple[list[TestImage], np.ndarray, dict[str, PixelHistogram], float,
                              RegionCounts | None]:
    """Score labelled images: (kept, their scores, pixel histogram per defect, seconds,
    the verdict's counts at the model's thresholds or None without a calibration).

    Maps (at the photo's size or the crop's, ``maps_at``) go to ``spool`` (when overlays
    or maps are written) and into the histograms: a defective image without a mask into
    the one of :data:`NO_MASK` (the overlays' colour scale counts it, the pixel metrics
    do not).
    """
    cal = model.calibration
    counts = RegionCounts() if cal is not None else None
    items = usable_masks(items, skipped)
    by_path = {i.path: i for i in items}
    kept, scores = [], []
    pixels: dict[str, PixelHistogram] = {}
    seconds = 0.0
    batches = model.predict_batches([i.path for i in items], skipped, progress=progress,
                                    maps_at=maps_at) if items else iter(())
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        seconds += time.perf_counter() - t0  # scoring time (not the bookkeeping)
        if batch is None:
            break
        paths, batch_scores, maps = batch
        done = [by_path[p] for p in paths]
        kept += done
        truths = [mask_of(i, model.preprocess, maps_at) if i.mask else None for i in done]
        add_maps(pixels, [i.defect if in_pixel_metrics(i) else NO_MASK for i in done], maps,
                 truths)
        if counts is not None:
            for i, s, amap, truth in zip(done, batch_scores, maps, truths):
                counts.add(bool(i.label), bool(label(float(s), cal)),
                           find_regions(amap, cal.pixel_threshold)[1], truth)
        scores.append(batch_scores)
        if spool is not None:
            spool.append(maps)
    return kept, (np.concatenate(scores) if scores else np.empty(0, np.float32)), pixels, \
        seconds, counts


def _evaluate_ranks(launch: distributed.Launch, model: PatchCore, items: Sequence[TestImage],
                    skipped: list[str], spool: MapSpool | None, progress: bool,
                    maps_at: str = "original"
                    ) -> tuple[list[TestImage], np.ndarray, dict[str, PixelHistogram], float,
                               list[TestImage], dict | None, RegionCounts | None]:
    """:func:`_evaluate_pass` on this rank's share (:func:`~patchcore_fast.score_run.shares`), merged over the ranks
    (one :meth:`~patchcore_fast.distributed.Launch.exchange`; one process: its own pass).

    The per-defect histograms of the ranks are merged (:meth:`PixelHistogram.combined`:
    the counts add up, so pixel AUROC and PRO are those of one process).

    Returns:
        (kept, scores, pixels, seconds) of all ranks as :func:`_evaluate_pass` (seconds:
        the slowest rank's), the images this rank scored and keeps (in its spool), and the
        run's ``distributed`` record for metrics.json (None in one process).
    """
    share, keeps = shares(launch, model, items)
    mine: list[TestImage] = []

    def work():
        missed: list[str] = []
        kept, scores, pixels, seconds, counts = _evaluate_pass(
            model, share, missed, spool if keeps else None, progress and launch.is_main,
            maps_at)
        mine.extend(kept if keeps else ())
        return (kept, scores, pixels, missed, seconds, counts) if keeps else None, len(share)

    answers = launch.exchange(work)
    parts = [part for part, _ in answers if part is not None]
    per_defect: dict[str, list[PixelHistogram]] = {}
    for part in parts:
        for defect, hist in part[2].items():
            per_defect.setdefault(defect, []).append(hist)
    skipped += [f for part in parts for f in part[3]]
    record = {"world_size": launch.world,
              "bank_shards": isinstance(model.bank, ShardedBank),
              "rank_images": [n for _, n in answers]}  # images each rank scored
    return ([i for part in parts for i in part[0]], np.concatenate([p[1] for p in parts]),
            {d: PixelHistogram.combined(h) for d, h in per_defect.items()},
            max(part[4] for part in parts), mine, record if launch.world > 1 else None,
            _merged([part[5] for part in parts]))


def _merged(counts: Sequence[RegionCounts | None]) -> RegionCounts | None:
    """The ranks' verdict counts added up (None without a calibration)."""
    if not counts or counts[0] is None:
        return None
    total = RegionCounts()
    for c in counts:
        total.merge(c)
    return total


def evaluate_category(name: str, model: PatchCore, items: Sequence[TestImage],
                      skipped: list[str], out: Path, model_file: str,
                      overlays: bool = True, save_maps: bool = False,
                      temp_dir: str | None = None, progress: bool = False,
                      maps_at: str = "original", overlay_format: str = "png") -> dict:
    """Metrics of one labelled test set; writes metrics.json, roc.png, scores.csv, overlays.

    Under torchrun each rank scores its share of the images and writes their overlays
    (:func:`_evaluate_ranks`); rank 0 writes the merged metrics.json, roc.png and
    scores.csv (``score_seconds`` is then the slowest rank's).

    Args:
        name: the category (in the files and messages).
        model: the fitted model.
        items: the labelled test images.
        skipped: list collecting unreadable files (and images with unusable masks).
        out: output folder.
        model_file: the model as named on the command line (recorded in metrics.json).
        overlays, save_maps: which image files to write.
        temp_dir: folder of the temporary map file.
        progress: show a progress bar.
        maps_at: ``original``: maps and pixel metrics at each photo's own size (every
            pixel of the original mask); ``crop``: at the model's input, padding left out
            (the paper's protocol). metrics.json says which (``maps_at``).
        overlay_format: ``png`` or ``jpg``.

    Returns:
        the contents of metrics.json.
    """
    names = dict(zip((i.path for i in items), evaluation_names(items)))
    launch = distributed.current()
    with MapSpool(np.float32, temp_dir, "map file") as spool:
        keep = spool if overlays or save_maps else None
        kept, scores_arr, pixels, seconds, mine, record, counts = _evaluate_ranks(
            launch, model, items, skipped, keep, progress, maps_at)
        if not kept:
            raise PatchCoreError(f"none of the test images of {name} could be read")
        result = _metrics(kept, scores_arr, pixels)
        result = {"category": name, **result, "maps_at": maps_at, "skipped": skipped,
                  "score_seconds": seconds, "seconds_per_image": seconds / len(kept),
                  "model": {"file": text_name(model_file),
                            "config": json.loads(model.config.to_json()),
                            "fit_stats": model.fit_stats},
                  **({"distributed": record} if record else {}),
                  "at_threshold": _at_threshold(model, counts, has_ground_truth(kept))}
        everything = PixelHistogram.combined(list(pixels.values()))

        def write_maps():
            if keep is not None and mine:
                cal = model.calibration
                write_map_files(out, spool, [(i.path, names[i.path]) for i in mine],
                                model.preprocess, everything, overlays, save_maps,
                                scale=cal and (cal.colour_min, cal.colour_max),
                                regions_at=cal and cal.pixel_threshold,
                                overlay_format=overlay_format)

        launch.exchange(write_maps)  # every rank's files written, or the error
    if launch.is_main:
        truth = [h for k, h in pixels.items() if k != NO_MASK]
        write_evaluation(out, result, kept, scores_arr,
                         PixelHistogram.combined(truth) if has_ground_truth(kept) else None)
    return result


def _at_threshold(model: PatchCore, counts: RegionCounts | None, masks: bool) -> dict | None:
    """metrics.json's verdict at the model's own thresholds (None without a calibration):
    false-reject rate on good images, miss rate on defective ones and, with masks, pixel
    precision / recall / IoU over the defective images and the share of ground-truth
    regions hit by a region."""
    if counts is None:
        return None
    cal = model.calibration
    out = counts.result()
    if not masks:
        for k in ("pixel_precision", "pixel_recall", "pixel_iou", "region_hit_rate"):
            out[k] = None
    return {"image_threshold": cal.image_threshold, "pixel_threshold": cal.pixel_threshold,
            "target_false_reject_rate": cal.false_reject_rate, **out}


def study_category(name: str, folder: Path, config: PatchCoreConfig, ratios: Sequence[float],
                   temp_dir: str | None = None, progress: bool = False,
                   maps_at: str = "original") -> Iterator[dict]:
    """Fit one MVTec-style category at several coreset ratios and evaluate each bank.

    The test embeddings (scored again at every ratio) and their masks wait in temporary
    files; the training features stream through the fit once
    (:meth:`~patchcore_fast.model.PatchCore.fit_each_ratio`).

    Args:
        name: the category.
        folder: its folder (``train/good``, ``test``, ``ground_truth``).
        config: the model's settings (its ``coreset_ratio`` is replaced by each ratio).
        ratios: coreset ratios, in the order to fit them.
        temp_dir: folder of the temporary files.
        progress: show progress bars.
        maps_at: where the pixel metrics are taken, as :func:`evaluate_category`.

    Yields:
        one row per ratio: ratio, bank size, image / pixel AUROC, PRO, F1-max and times.
    """
    skipped: list[str] = []
    items = usable_masks(mvtec_test(folder, skipped), skipped)
    by_path = {i.path: i for i in items}
    model = PatchCore(config)
    if config.resize == "shorter" and not config.crop:
        raise PatchCoreError("study needs inputs of one shape: with --resize shorter give a "
                             "--crop, or use --resize longer or stretch")
    pre = model.preprocess
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        embeddings = masks = None
        kept = []
        sizes = []
        for paths, patches, read in model.embed_batches([i.path for i in items], skipped,
                                                        progress, f"{name}: test features",
                                                        with_sizes=True):
            if embeddings is None:
                embeddings = stack.enter_context(ArraySpool(
                    patches.shape[1:], np.float32, temp_dir, "test-feature file"))
                masks = stack.enter_context(MapSpool(np.bool_, temp_dir, "mask file"))
            embeddings.append(patches.float().cpu().numpy())
            kept += [by_path[p] for p in paths]
            sizes += read
            masks.append([mask_of(by_path[p], pre, maps_at, size)
                          for p, size in zip(paths, read)])
        if not kept:
            raise PatchCoreError(f"none of the test images of {name} could be read")
        test_seconds = time.perf_counter() - t0
        grid, size = model.grid, model.input_size
        places = [pre.placement(wh) for wh in sizes]
        defects = [i.defect if in_pixel_metrics(i) else NO_MASK for i in kept]
        for ratio in model.fit_each_ratio(folder / "train" / "good", ratios, skipped,
                                          progress, temp_dir):
            t0 = time.perf_counter()
            scores, pixels, at = [], {}, 0
            for batch in embeddings.batches(config.batch_size):
                s, maps = model.score_embeddings(torch.from_numpy(batch).to(model.device),
                                                 grid, size)
                scores.append(s.numpy())
                back = [(p.to_original(m) if maps_at == "original" else p.to_crop(m)).numpy()
                        for p, m in zip(places[at:], maps)]
                add_maps(pixels, defects[at:at + len(batch)], back,
                         masks.read(at, at + len(batch)))
                at += len(batch)
            score_s = time.perf_counter() - t0 + test_seconds
            r = _metrics(kept, np.concatenate(scores), pixels)
            st = model.fit_stats
            yield {"category": name, "coreset_ratio": ratio, "bank_rows": st["bank_rows"],
                   "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"],
                   "pro": r["pro"], "f1_max": r["f1_max"], "fit_seconds": st["fit_seconds"],
                   "coreset_seconds": st["coreset_seconds"],
                   "score_seconds_per_image": score_s / len(kept)}
