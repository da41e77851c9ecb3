"""The score run: score images with a fitted model, write their overlays and maps.

:func:`plan_score` checks every output and makes the run record before any work;
:func:`earlier_results` says what an earlier run into the folder finished (``--resume``);
:func:`score_images` scores, finds each image's defect regions and writes its files,
journalled image by image, its images shared among torchrun's ranks (:func:`shares`,
also the evaluation's split): in one pass with a calibrated model (its colour scale is
fixed), in two without one (scores and a pixel histogram, then the files).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np

from . import distributed
from .errors import PatchCoreError
from .files import MapSpool, check_outputs, file_sha256, text_name
from .journal import Journal, read_done, run_record
from .metrics import PixelHistogram
from .model import PatchCore
from .outputs import score_files, unique_names
from .overlays import write_map_files, write_maps_as_they_come
from .sharded import ShardedBank

__all__ = ["earlier_results", "plan_score", "score_images", "shares"]


def plan_score(option: str, model_file: str | Path, input_args: Sequence[str], inputs: list[Path],
               out: Path, threshold: float | None, overlays: bool, save_maps: bool,
               weights: str | None, resume: bool,
               launch: distributed.Launch = distributed.ONE_PROCESS,
               save_masks: bool = False, min_region_area: int = 0,
               overlay_format: str = "png") -> tuple[dict, dict]:
    """What a score run writes and still has to do, checked before any work.

    ``option`` names the output folder in errors (``-o OUT``). Output names come from the
    whole input list, so that a resumed run names files the
    same way; every output path is checked (inside ``out``, never over an input); the run
    record (model and weights hashes, options that change outputs) is what ``--resume``
    must find in the earlier run's journal. ``launch``: the run's (``--resume`` is one
    process's).

    Returns:
        (names: input -> output stem, run record); :func:`earlier_results` then says what
        is done.
    """
    names = dict(zip(inputs, unique_names(inputs)))
    check_outputs(option, out, score_files(out, list(names.values()), overlays, save_maps,
                                           save_masks, overlay_format),
                  [p for p in input_args if Path(p).is_dir()],
                  [*inputs, model_file, *([weights] if weights else [])])
    if resume and launch.world > 1:
        # The journal is one file that lists a prefix of the inputs in order, appended by
        # the one process that writes them; ranks writing their shares at once would need
        # one journal each and a merge that knows every rank's share of the earlier run.
        raise PatchCoreError("--resume does not run under torchrun (the resume journal is "
                             "written by one process); resume the run as one process")
    run = run_record(file_sha256(model_file), weights and file_sha256(weights), threshold,
                     overlays, save_maps, save_masks, min_region_area, overlay_format)
    return names, run


def earlier_results(out: Path, run: dict, inputs: Sequence[Path], resume: bool,
                    regions: dict | None = None) -> tuple[dict[str, float], list[Path]]:
    """(score by file name of the images an earlier run into ``out`` finished, the inputs
    still to score): read under the output folder's lock, so that no other run is writing
    them meanwhile. ``regions`` gets their regions (as :func:`score_images`)."""
    done = read_done(out, run, regions) if resume else {}
    return done, [p for p in inputs if text_name(p) not in done]


def score_images(model: PatchCore, paths: Sequence[Path], names: dict[Path, str], out: Path,
                 skipped: list[str], resume: bool = False, overlays: bool = True,
                 save_maps: bool = False, temp_dir: str | None = None,
                 progress: bool = False, run: dict | None = None, save_masks: bool = False,
                 min_region_area: int = 0, regions: dict | None = None,
                 overlay_format: str = "png") -> dict[str, float]:
    """Score images; find their defect regions, write their overlays, maps and masks, and
    record each one in the journal.

    With a calibrated model everything happens in one pass: each batch's maps go to the
    writer threads as it is scored (:func:`~patchcore_fast.overlays.write_maps_as_they_come`:
    the regions at the model's pixel threshold, the overlays in its fixed colour scale).
    Without calibration (a model file from before it) there are no regions, and two passes:
    pass 1 scores batch by batch, each batch's maps going to a temporary file and into a
    histogram of their pixels that sets the colour scale; pass 2 writes the images. An
    image enters the journal (:class:`~patchcore_fast.journal.Journal`) once its files are
    written, so a killed run resumes exactly where its outputs stop.

    Under torchrun each rank scores its share (:func:`shares`) and counts its maps'
    pixels; one :meth:`~patchcore_fast.distributed.Launch.exchange` brings every rank's
    scores, read failures and histogram to every rank. The overlays' colour scale comes
    from the merged histogram (:meth:`PixelHistogram.combined` of all ranks' counts is the
    one-process histogram); each rank then writes the files of the images it scored, and a
    second exchange says that all are written. No rank keeps a journal.

    Args:
        model: the fitted model.
        paths: image files to score.
        names: output name of each file (unique within the run).
        out: output folder.
        skipped: list collecting unreadable files.
        resume: append to the journal of an earlier run.
        overlays, save_maps, save_masks: which image files to write (masks: a calibrated
            model's).
        temp_dir: folder of the temporary map file.
        progress: show a progress bar.
        run: the run's record for the journal (model hash, options).
        min_region_area: regions of fewer pixels are left out.
        regions: if given, gets each scored image's regions by file name (a list of
            :func:`~patchcore_fast.regions.regions_json` dicts; a calibrated model's only).
        overlay_format: ``png`` or ``jpg`` (:data:`~patchcore_fast.overlays.OVERLAY_FORMATS`).

    Returns:
        image score by file name (:func:`~patchcore_fast.files.text_name`), every rank's
        (in input order); ``skipped`` gets every rank's unreadable files.
    """
    launch = distributed.current()
    share, keeps = shares(launch, model, paths)
    images = overlays or save_maps
    order: list[Path] = []
    cal = model.calibration
    one_pass = keeps and cal is not None
    # The journal is one file that one process appends (plan_score refuses --resume under
    # torchrun): the ranks of a distributed run keep none.
    journal = Journal(out, resume, run, keep=launch.world == 1)
    with contextlib.closing(journal), MapSpool(np.float32, temp_dir, "map file") as spool:
        def first_pass():
            new, pixels, missed, found = {}, PixelHistogram(), [], {}
            # The one pass draws each overlay on the pixels read for its map (no second
            # decoding of the file).
            batches = model.predict_batches(share, missed, progress and launch.is_main,
                                            photos=one_pass and overlays) if share else ()
            if one_pass:
                # The model's colour scale is fixed: each batch's regions are found and its
                # files written as it is scored (writer threads), each image journalled
                # once they are on disk.
                def as_they_come():
                    for batch, scores, maps, *pixels in batches:
                        new.update(zip(map(text_name, batch), scores.tolist()))
                        order.extend(batch)
                        photos = pixels[0] if pixels else [None] * len(batch)
                        yield from zip(batch, (names[p] for p in batch), maps, photos)

                def written(p: Path, where: list) -> None:
                    found[text_name(p)] = where
                    journal.record([(p, new[text_name(p)], where)])

                write_maps_as_they_come(out, as_they_come(), model.preprocess,
                                        cal.colour_min, cal.colour_max, overlays, save_maps,
                                        written, regions_at=cal.pixel_threshold,
                                        min_area=min_region_area, save_masks=save_masks,
                                        overlay_format=overlay_format)
                return new, pixels, missed, found
            for batch, scores, maps in batches:
                new.update(zip(map(text_name, batch), scores.tolist()))
                order.extend(batch)
                if images and keeps:
                    spool.append(maps)
                    for amap in maps:
                        pixels.add(amap)
                elif not images:
                    journal.record([(p, new[text_name(p)]) for p in batch])
            return (new, pixels, missed, found) if keeps else None

        parts = [p for p in launch.exchange(first_pass) if p is not None]
        new = {k: v for scores, _, _, _ in parts for k, v in scores.items()}
        skipped += [f for _, _, missed, _ in parts for f in missed]
        if regions is not None:
            regions.update((k, v) for _, _, _, found in parts for k, v in found.items())
        everything = PixelHistogram.combined([h for _, h, _, _ in parts])

        def second_pass():
            if images and keeps and order and not one_pass:
                write_map_files(out, spool, [(p, names[p]) for p in order], model.preprocess,
                                everything, overlays, save_maps,
                                written=lambda p, _: journal.record([(p, new[text_name(p)])]),
                                overlay_format=overlay_format)

        launch.exchange(second_pass)
    return new


def shares(launch: distributed.Launch, model: PatchCore, items: Sequence) -> tuple[list, bool]:
    """What one rank scores, and whether it keeps the results (one process: all, kept).

    Images split across the ranks in whole batches of the one-process run (contiguous
    shares in rank order, so the merged results come in input order, and each batch holds
    the images it holds in one process: the backbone's rounding can depend on a batch's
    other images, so the scores stay one process's bit for bit while no file is skipped).
    With ``--bank-shards`` every rank scores every image, in lockstep (the bank's
    collectives), and rank 0 keeps the results.
    """
    if isinstance(model.bank, ShardedBank):
        return list(items), launch.is_main
    size = model.config.batch_size
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    return [item for batch in launch.share(batches) for item in batch], True
