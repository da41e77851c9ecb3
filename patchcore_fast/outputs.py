"""The files a run leaves, other than the overlays and the journal: output names, the
plan of every file a run may write, CSV / JSON / Markdown tables and plots.

Every file is written atomically (:mod:`patchcore_fast.files`): a reader never sees half
of one, and a failed run leaves the old file or none. The overlays and raw maps are
:mod:`~patchcore_fast.overlays`' and score's resume journal :mod:`~patchcore_fast.journal`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics
from .files import atomic_path, csv_rows, text_name, write_text
from .journal import JOURNAL


#: Bytes a part of an output name may have: a file system's 255, less the ``.png`` or
#: ``.npy`` of the overlay and the map and room for a ``_N`` counter.
NAME_BYTES = 240


def _fit_name(part: str) -> str:
    """One part of an output name within :data:`NAME_BYTES`: as it is, or its first bytes
    (whole characters), ``~``, 8 hex digits of the SHA-256 of the whole part and its
    extension (``aaaa...~1f2e3d4c.png``): still readable, and distinct for distinct
    parts."""
    raw = part.encode("utf-8")
    if len(raw) <= NAME_BYTES:
        return part
    _, dot, ext = part.rpartition(".")
    ext = f".{ext}" if dot and len(ext.encode("utf-8")) <= 16 else ""
    keep = NAME_BYTES - len(ext.encode("utf-8")) - 9
    return f"{raw[:keep].decode('utf-8', 'ignore')}~{hashlib.sha256(raw).hexdigest()[:8]}{ext}"


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names of input images, distinct for every input and still readable: the one
    name policy of the overlays and maps, applied before any work.

    A name is the file name with its extension (``a.png`` and ``a.jpg`` stay apart, and
    neither meets ``a_1.png``); files of the same name in different folders get as many of
    their parent folders as it takes to tell them apart (``day1/a.png``, ``day2/a.png``,
    written into sub-folders). Names are compared case-insensitively, as some file systems
    do. A name is text (:func:`~patchcore_fast.files.text_name`: a byte that is not UTF-8
    as ``\\xNN``), and a part too long for a file with ``.png`` after it is cut with a
    hash (:func:`_fit_name`). The name depends on the whole list only, so a resumed run
    names files the same way.

    Args:
        paths: input images (each once).

    Returns:
        one relative name per path, in order.
    """
    parts = [tuple(_fit_name(x) for x in Path(text_name(os.path.abspath(p))).parts[1:])
             for p in paths]  # no anchor: no "/" part
    depth = [1] * len(parts)
    while True:
        groups: dict[str, list[int]] = {}
        for i, pp in enumerate(parts):
            groups.setdefault("/".join(pp[-depth[i]:]).casefold(), []).append(i)
        grew = False
        for members in groups.values():
            if len(members) > 1:
                for i in members:
                    if depth[i] < len(parts[i]):
                        depth[i] += 1
                        grew = True
        if not grew:
            break
    names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
    # The same file listed twice (or names equal but for case): a counter, made unique.
    taken = {n.casefold() for n in names}
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n.casefold() in seen:
            k = 1
            while f"{n}_{k}".casefold() in taken:
                k += 1
            names[i] = f"{n}_{k}"
            taken.add(names[i].casefold())
        seen.add(names[i].casefold())
    return names


def evaluation_names(items: Sequence) -> list[str]:
    """Output names of evaluate's test images: ``<defect>/<unique name>``.

    Args:
        items (Sequence[datasets.TestImage]): the test images.
    """
    by_defect: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_defect.setdefault(item.defect, []).append(i)
    names = [""] * len(items)
    for defect, idx in by_defect.items():
        for i, n in zip(idx, unique_names([items[i].path for i in idx])):
            names[i] = f"{defect}/{n}"
    return names


def image_files(out: Path, names: Sequence[str], overlays: bool, save_maps: bool,
                overlay_format: str = "png") -> list[Path]:
    """The overlay and map files that :func:`write_map_files` writes for ``names``."""
    return ([out / "overlays" / f"{n}.{overlay_format}" for n in names] if overlays
            else []) + \
        ([out / "maps" / f"{n}.npy" for n in names] if save_maps else [])


def score_files(out: Path, names: Sequence[str], overlays: bool, save_maps: bool,
                save_masks: bool = False, overlay_format: str = "png") -> list[Path]:
    """Every file score may write into ``out`` (checked before any work)."""
    return [out / "scores.csv", out / "scores.json", out / JOURNAL,
            *image_files(out, names, overlays, save_maps, overlay_format),
            *([out / "masks" / f"{n}.png" for n in names] if save_masks else [])]


def evaluation_files(out: Path, items: Sequence, overlays: bool, save_maps: bool,
                     overlay_format: str = "png") -> list[Path]:
    """Every file evaluate may write into ``out`` for one category."""
    return [out / "scores.csv", out / "roc.png", out / "metrics.json",
            *image_files(out, evaluation_names(items), overlays, save_maps, overlay_format)]


def summary_files(out: Path) -> list[Path]:
    """The files of :func:`write_summary`."""
    return [out / f"summary.{e}" for e in ("csv", "json", "md")]


def fmt_metric(value: float | None) -> str:
    """A metric as the command prints it: four decimals, or ``n/a`` (not computable)."""
    return "n/a" if value is None else f"{value:.4f}"


# ----- tables ---------------------------------------------------------------------------

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV
#: injection"): a file named ``=HYPERLINK(...).png`` must stay text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a
    leading single quote (the OWASP rule); numbers and other strings are unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A CSV table as text (``\\n`` line ends), with formula-like cells neutralised
    (:func:`safe_cell`)."""
    return csv_rows([[safe_cell(v) for v in row] for row in [header, *rows]])


def write_scores(out: Path, model_file: str, scores: dict[str, float],
                 inputs: Sequence[Path], threshold: float | None, skipped: list[str],
                 run: dict | None = None, calibration=None, above: str = ">=",
                 regions: dict[str, list | None] | None = None) -> int:
    """score's ``scores.csv`` and ``scores.json``, in input order; then the resume
    journal, which they replace, is removed.

    Args:
        out: output folder.
        model_file: the model, as named on the command line.
        scores: image score by file name (:func:`~patchcore_fast.files.text_name`; this
            run's and a resumed run's).
        inputs: every input image, in order (those without a score are left out).
        threshold: raw image score that labels images, or None (no labels).
        skipped: the files left out (unreadable, unsupported, ...).
        run: the run's record (model hash, options), kept for ``--resume``.
        calibration (calibration.Calibration | None): the model's; adds the normalised
            score.
        above: ``>`` (defective above the threshold: the calibrated one) or ``>=`` (at or
            above: a threshold given on the command line).
        regions: each image's defect regions by file name (a calibrated model's): listed
            in scores.json; scores.csv gets their number and the largest one's area.

    Returns:
        the number of images written.
    """
    from .calibration import LABELS, normalise

    rows, records = [], []
    for path in map(text_name, inputs):
        if path not in scores:
            continue
        rec = {"file": path, "score": scores[path]}
        if calibration is not None:
            rec["normalised"] = round(float(normalise(rec["score"], calibration)), 6)
        if threshold is not None:
            bad = rec["score"] > threshold if above == ">" else rec["score"] >= threshold
            rec["label"] = LABELS[bool(bad)]
        row = list(rec.values())
        if regions is not None:
            rec["regions"] = where = regions.get(path)
            row += ["", ""] if where is None else \
                [len(where), max((r["area"] for r in where), default=0)]
        records.append(rec)
        rows.append(row)
    header = ["file", "score"] + (["normalised"] if calibration is not None else []) \
        + (["label"] if threshold is not None else []) \
        + (["regions", "largest_region_area"] if regions is not None else [])
    write_text(out / "scores.csv", csv_text(header, rows))
    write_text(out / "scores.json", json.dumps(
        {"model": text_name(model_file), "threshold": threshold,
         "labelled": None if threshold is None else f"defective when score {above} threshold",
         "calibration": None if calibration is None else {
             k: getattr(calibration, k) for k in ("image_threshold", "pixel_threshold",
                                                  "scale", "false_reject_rate")},
         "regions": None if regions is None else {
             "pixel_threshold": None if calibration is None else calibration.pixel_threshold,
             "min_region_area": (run or {}).get("min_region_area", 0),
             "fields": "area (pixels), bbox [x0, y0, x1, y1] (x1, y1 exclusive), centroid "
                       "[x, y], peak and mean map value; largest peak first"},
         "run": run, "images": records,
         "skipped": skipped}, indent=2, allow_nan=False))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / JOURNAL)
    return len(records)


def write_evaluation(out: Path, result: dict, items: Sequence, scores: np.ndarray,
                     pixels) -> None:
    """evaluate's ``scores.csv``, ``roc.png`` and ``metrics.json`` for one category.

    Args:
        out: output folder.
        result: the metrics (``metrics.evaluate`` plus the run's details).
        items (Sequence[datasets.TestImage]): the images scored, in order.
        scores (float32 array[N]): their image scores.
        pixels (metrics.PixelHistogram | None): all pixels, for the pixel ROC (None: no
            ground truth).
    """
    write_text(out / "scores.csv", csv_text(
        ["file", "defect", "label", "score"],
        [[text_name(i.path), i.defect, i.label, s] for i, s in zip(items, scores.tolist())]))
    save_roc_plot(out / "roc.png", [i.label for i in items], scores, pixels,
                          title=result["category"])
    write_text(out / "metrics.json", json.dumps(result, indent=2))


def write_summary(out: Path, results: list[dict]) -> None:
    """``summary.csv``, ``summary.json`` and ``summary.md``: one row per category and
    their mean, as the paper reports it."""
    keys = ["image_auroc", "pixel_auroc", "pro", "f1_max"]
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
    plt = _pyplot()
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


def save_roc_plot(path: str | os.PathLike, labels: Sequence[int], scores: Sequence[float],
                  pixels: metrics.PixelHistogram | None = None, title: str = "") -> None:
    """Write the image (and pixel) ROC curves as a PNG, atomically.

    Args:
        path: PNG file.
        labels, scores: image labels and scores.
        pixels: optional histogram of all test pixels (pixel ROC).
        title: plot title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    labels = np.asarray(labels)
    if labels.min() != labels.max():
        fpr, tpr = metrics.image_roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"image (AUROC {metrics.image_auroc(labels, scores):.4f})")
    auc = pixels.auroc() if pixels is not None else None
    if auc is not None:
        fpr, tpr = pixels.roc_curve()
        if fpr.size > 20_000:  # a monotone curve: evenly spaced points draw the same line
            keep = np.unique(np.linspace(0, fpr.size - 1, 20_000).astype(np.int64))
            fpr, tpr = fpr[keep], tpr[keep]
        ax.plot(fpr, tpr, label=f"pixel (AUROC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
           ylim=(0, 1.01), title=title or "ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib  # here, not at start-up: only the runs that plot need it (~0.5 s)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
