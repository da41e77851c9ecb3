"""The files a run leaves: overlays, raw maps, CSV / JSON / Markdown tables, plots and the
resume journal of ``score``.

Every file is written atomically (:mod:`patchcore_fast.files`): a reader never sees half
of one, and a failed run leaves the old file or none. Maps reach this module parked in a
temporary :class:`~patchcore_fast.files.ArraySpool` (never all in memory); the colour scale
of the overlays comes from a histogram of all their pixels
(:class:`~patchcore_fast.metrics.PixelHistogram`), so it is the same for every image of a run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import functools
import io
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import PatchCoreError
from .files import ArraySpool, atomic_path, write_text

#: score's progress, for ``--resume`` (removed when the run finishes).
JOURNAL = ".scores.partial.csv"


# ----- images ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _jet_lut() -> np.ndarray:
    """matplotlib's ``jet`` as its 256-entry table, float64 [256, 3] in 0-255.

    A matplotlib colormap is this table: ``cmap(t)`` for t in [0, 1] is entry
    ``min(int(t * 256), 255)``, so indexing it gives the same colours without the per-call
    RGBA float array (4 x 8 bytes a pixel) that ``cmap(t)`` builds.
    """
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    return cmap(np.arange(cmap.N))[:, :3] * 255.0


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Blend a jet-coloured map onto the image (half and half where the map is high).

    Args:
        image (float or uint8 array[H, W, 3]): the image as the model saw it, 0-255.
        amap (float32 array[H, W]): its anomaly map.
        vmin, vmax: map values drawn as the coldest and hottest colour.

    Returns:
        uint8 array[H, W, 3].
    """
    t = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    lut = _jet_lut()
    colour = lut[np.minimum((t * len(lut)).astype(np.intp), len(lut) - 1)]
    alpha = 0.25 + 0.35 * t[..., None]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def write_overlay(path: Path, source: Path, amap: np.ndarray, preprocess, vmin: float,
                  vmax: float) -> None:
    """Write the overlay of ``amap`` on the image ``source`` as a PNG."""
    from PIL import Image

    from .data import read_image

    img = preprocess.display(read_image(source)).astype(np.float64)
    with atomic_path(path) as tmp:
        # zlib level 1: a third of the default level's encoding time for files about 10 %
        # larger (bench/RESULTS.md, "End to end"); PNG stays lossless.
        Image.fromarray(overlay(img, amap, vmin, vmax)).save(tmp, format="PNG",
                                                             compress_level=1)


def write_npy(path: Path, array: np.ndarray) -> None:
    """Write one array as ``.npy``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def map_range(pixels) -> tuple[float, float]:
    """Colour scale of the overlays: the 1st and 99.9th percentile of all map pixels.

    Args:
        pixels (metrics.PixelHistogram): every pixel of the maps drawn.
    """
    return pixels.quantile(0.01), pixels.quantile(0.999)


def writer_threads() -> int:
    """Threads that write overlays and maps: PNG encoding (zlib) and numpy release the
    GIL, so a few threads keep the cores busy; more than 4 only add memory."""
    return max(1, min(4, os.cpu_count() or 1))


def write_map_files(out: Path, spool: ArraySpool, images: Sequence[tuple[Path, str]],
                    preprocess, pixels, overlays: bool = True, save_maps: bool = False,
                    written: Callable[[Path], None] | None = None,
                    threads: int | None = None) -> None:
    """The second pass of score and evaluate: each parked map to its overlay and ``.npy``.

    Images are written by a small pool of threads (each file atomically, as before); the
    spool is read and ``written`` is called in this thread, in the order of ``images``,
    so the resume journal lists a prefix of the images in order: an image is recorded
    only once its files and those of every image before it are on disk. At most
    ``2 * threads`` maps are in flight (bounded memory). The first error stops the pool
    and is raised here.

    Args:
        out: output folder (files go to ``overlays/<name>.png`` and ``maps/<name>.npy``).
        spool: the maps, item i belonging to ``images[i]``.
        images: (source image, name relative to ``overlays/`` and ``maps/``) per map.
        preprocess (data.Preprocess): the model's image geometry.
        pixels (metrics.PixelHistogram): every pixel of the maps (sets the colour scale).
        overlays: write the overlay PNGs.
        save_maps: write the raw maps.
        written: called with each source image once its files are written.
        threads: writer threads (default :func:`writer_threads`).
    """
    vmin, vmax = map_range(pixels)

    def write_one(source: Path, name: str, amap: np.ndarray) -> Path:
        if overlays:
            write_overlay(out / "overlays" / f"{name}.png", source, amap, preprocess,
                          vmin, vmax)
        if save_maps:
            write_npy(out / "maps" / f"{name}.npy", amap)
        return source

    threads = threads or writer_threads()
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="writer")
    try:
        for i, (source, name) in enumerate(images):
            pending.append(pool.submit(write_one, source, name, spool.read(i)[0]))
            while len(pending) >= 2 * threads or (pending and i == len(images) - 1):
                done = pending.popleft().result()
                if written is not None:
                    written(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems made unique by a counter (``a``, ``a_1``, ...), in order."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


# ----- tables ---------------------------------------------------------------------------

def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A CSV table as text (``\\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_scores(out: Path, model_file: str, scores: dict[str, float],
                 inputs: Sequence[Path], threshold: float | None, skipped: list[str]
                 ) -> int:
    """score's ``scores.csv`` and ``scores.json``, in input order; then the resume
    journal, which they replace, is removed.

    Args:
        out: output folder.
        model_file: the model, as named on the command line.
        scores: image score by file name (this run's and a resumed run's).
        inputs: every input image, in order (those without a score are left out).
        threshold: image score from which an image is labelled anomalous, or None.
        skipped: the unreadable files.

    Returns:
        the number of images written.
    """
    rows, records = [], []
    for path in inputs:
        if str(path) not in scores:
            continue
        rec = {"file": str(path), "score": scores[str(path)]}
        if threshold is not None:
            rec["label"] = "anomalous" if rec["score"] >= threshold else "good"
        records.append(rec)
        rows.append([rec[k] for k in rec])
    header = ["file", "score"] + (["label"] if threshold is not None else [])
    write_text(out / "scores.csv", csv_text(header, rows))
    write_text(out / "scores.json", json.dumps(
        {"model": model_file, "threshold": threshold, "images": records, "skipped": skipped},
        indent=2))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / JOURNAL)
    return len(records)


def write_evaluation(out: Path, result: dict, items: Sequence, scores: np.ndarray,
                     pixels) -> None:
    """evaluate's ``scores.csv``, ``roc.png`` and ``metrics.json`` for one category.

    Args:
        out: output folder.
        result: the metrics (``metrics.evaluate`` plus the run's details).
        items (Sequence[data.TestImage]): the images scored, in order.
        scores (float32 array[N]): their image scores.
        pixels (metrics.PixelHistogram | None): all pixels, for the pixel ROC (None: no
            ground truth).
    """
    from . import metrics

    write_text(out / "scores.csv", csv_text(
        ["file", "defect", "label", "score"],
        [[str(i.path), i.defect, i.label, s] for i, s in zip(items, scores.tolist())]))
    metrics.save_roc_plot(out / "roc.png", [i.label for i in items], scores, pixels,
                          title=result["category"])
    write_text(out / "metrics.json", json.dumps(result, indent=2))


def write_summary(out: Path, results: list[dict], extra_cols: Sequence[str] = ()) -> None:
    """``summary.csv``, ``summary.json`` and ``summary.md``: one row per category and
    their mean, as the paper reports it."""
    keys = ["image_auroc", "pixel_auroc", "pro", "f1_max", *extra_cols]
    rows = [[r["category"]] + [r.get(k) for k in keys] for r in results]
    mean = []
    for j, _ in enumerate(keys):
        vals = [row[j + 1] for row in rows if row[j + 1] is not None]
        mean.append(float(np.mean(vals)) if vals else None)
    rows.append(["mean"] + mean)
    write_text(out / "summary.csv", csv_text(["category", *keys], rows))
    write_text(out / "summary.json", json.dumps(
        {"categories": {r[0]: dict(zip(keys, r[1:])) for r in rows[:-1]},
         "mean": dict(zip(keys, mean))}, indent=2))
    lines = ["| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([row[0]] + ["" if v is None else f"{v:.4f}"
                                                    for v in row[1:]]) + " |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")


def write_study(out: Path, config_json: str, rows: list[dict]) -> None:
    """study's ``study.csv``, ``study.json`` and ``study.png`` (one row per category and
    ratio)."""
    keys = list(rows[0])
    write_text(out / "study.csv", csv_text(keys, [[r[k] for k in keys] for r in rows]))
    write_text(out / "study.json", json.dumps({"config": json.loads(config_json),
                                               "rows": rows}, indent=2))
    study_plot(out / "study.png", rows)


def study_plot(path: Path, rows: list[dict]) -> None:
    """AUROC and fit time against the coreset ratio, one line per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for cat in sorted({r["category"] for r in rows}):
        sel = [r for r in rows if r["category"] == cat]
        x = [r["coreset_ratio"] for r in sel]
        for key, style in (("image_auroc", "o-"), ("pixel_auroc", "s--")):
            y = [np.nan if r[key] is None else r[key] for r in sel]
            ax.plot(x, y, style, label=f"{cat} {key.replace('_', ' ')}")
        ax2.plot(x, [r["fit_seconds"] for r in sel], "o-", label=cat)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("coreset ratio")
        a.legend(fontsize=8)
    ax.set_ylabel("AUROC")
    ax2.set_ylabel("fit time (s)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----- score's resume journal -----------------------------------------------------------

def read_done(out: Path) -> dict[str, float]:
    """Scores already in ``out`` (a finished scores.csv and/or the journal of a killed run).

    A journal line cut short by the kill (no newline yet) is ignored: that image is scored
    again.
    """
    done: dict[str, float] = {}
    for name in ("scores.csv", JOURNAL):
        f = out / name
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        for row in csv.DictReader(io.StringIO(text)):
            try:
                done[row["file"]] = float(row["score"])
            except (KeyError, TypeError, ValueError):
                raise PatchCoreError(f"{f} is not a scores file of patchcore-fast; "
                                     f"score into another folder or without --resume") from None
    return done


class Journal:
    """score's record of finished images (``OUTDIR/.scores.partial.csv``).

    An image enters the journal once its files are written, so a killed run resumes exactly
    where its outputs stop. The file is opened at the first record: a run that fails before
    leaves none. Use it under ``contextlib.closing``.

    Args:
        out: output folder.
        resume: append to the journal of an earlier run instead of starting a new one.
    """

    def __init__(self, out: Path, resume: bool):
        self.out, self.resume = out, resume
        self._file = None

    def record(self, scores: Sequence[tuple[Path, float]]) -> None:
        """Add (image, score) rows and flush them to disk."""
        if self._file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            fresh = not (self.resume and (self.out / JOURNAL).is_file())
            self._file = open(self.out / JOURNAL, "w" if fresh else "a", encoding="utf-8",
                              newline="")
            if fresh:
                self._file.write("file,score\n")
        csv.writer(self._file, lineterminator="\n").writerows(
            [[str(p), s] for p, s in scores])
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent); the journal stays for ``--resume`` until
        :func:`write_scores` replaces it."""
        if self._file is not None:
            self._file.close()
            self._file = None
