"""The files a run leaves: overlays, raw maps, CSV / JSON / Markdown tables, plots and the
resume journal of ``score``.

Every file is written atomically (:mod:`patchcore_fast.files`): a reader never sees half
of one, and a failed run leaves the old file or none. Maps reach this module parked in a
temporary :class:`~patchcore_fast.files.MapSpool` (never all in memory); the colour scale
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
from .files import ArraySpool, MapSpool, atomic_path, check_outputs, fsync_folder, write_text

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
    """Write the overlay of ``amap`` on the image ``source`` as a PNG.

    A map at the photo's own size is laid on the photo itself; a crop-sized map
    (``maps_at="crop"``) on the model's input, without padding.
    """
    from PIL import Image

    from .data import read_image

    photo = read_image(source)
    if amap.shape == (photo.height, photo.width):
        img = np.asarray(photo).astype(np.float64)
    else:
        x0, y0, x1, y1 = preprocess.placement(photo.size).visible()
        img = preprocess.display(photo)[y0:y1, x0:x1].astype(np.float64)
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


def write_map_files(out: Path, spool: ArraySpool | MapSpool, images: Sequence[tuple[Path, str]],
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
    """Output names of input images, distinct for every input and still readable.

    A name is the file name with its extension (``a.png`` and ``a.jpg`` stay apart, and
    neither meets ``a_1.png``); files of the same name in different folders get as many of
    their parent folders as it takes to tell them apart (``day1/a.png``, ``day2/a.png``,
    written into sub-folders). Names are compared case-insensitively, as some file systems
    do. The name depends on the whole list only, so a resumed run names files the same way.

    Args:
        paths: input images (each once).

    Returns:
        one relative name per path, in order.
    """
    parts = [Path(os.path.abspath(p)).parts[1:] for p in paths]  # no anchor: no "/" part
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
        items (Sequence[data.TestImage]): the test images.
    """
    by_defect: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_defect.setdefault(item.defect, []).append(i)
    names = [""] * len(items)
    for defect, idx in by_defect.items():
        for i, n in zip(idx, unique_names([items[i].path for i in idx])):
            names[i] = f"{defect}/{n}"
    return names


def image_files(out: Path, names: Sequence[str], overlays: bool, save_maps: bool
                ) -> list[Path]:
    """The overlay and map files that :func:`write_map_files` writes for ``names``."""
    return ([out / "overlays" / f"{n}.png" for n in names] if overlays else []) + \
        ([out / "maps" / f"{n}.npy" for n in names] if save_maps else [])


def fit_targets(data: str | os.PathLike, categories: Sequence[str] | None,
                out: str | os.PathLike, weights: str | None = None
                ) -> list[tuple[str, Path, Path]]:
    """(name, training folder, model file) of each model that fit writes, checked before
    any work: every training folder exists, every model file can be written there (see
    :func:`files.check_outputs`).

    Args:
        data: a folder of good images, or an MVTec-style root or category folder.
        categories: the categories under ``data`` (plain folder names, or ``all``).
        out: a ``.safetensors`` file, or the folder of one ``<name>.safetensors`` per model.
        weights: the backbone weights file read by the fit, if any (never overwritten).
    """
    from .data import mvtec_categories

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


def score_files(out: Path, names: Sequence[str], overlays: bool, save_maps: bool
                ) -> list[Path]:
    """Every file score may write into ``out`` (checked before any work)."""
    return [out / "scores.csv", out / "scores.json", out / JOURNAL,
            *image_files(out, names, overlays, save_maps)]


def evaluation_files(out: Path, items: Sequence, overlays: bool, save_maps: bool
                     ) -> list[Path]:
    """Every file evaluate may write into ``out`` for one category."""
    return [out / "scores.csv", out / "roc.png", out / "metrics.json",
            *image_files(out, evaluation_names(items), overlays, save_maps)]


def summary_files(out: Path) -> list[Path]:
    """The files of :func:`write_summary`."""
    return [out / f"summary.{e}" for e in ("csv", "json", "md")]


def fmt_metric(value: float | None) -> str:
    """A metric as the command prints it: four decimals, or ``n/a`` (not computable)."""
    return "n/a" if value is None else f"{value:.4f}"


def run_record(model_sha256: str, weights_sha256: str | None, threshold: float | None,
               overlays: bool, save_maps: bool) -> dict:
    """What a score run's results depend on, kept with them for ``--resume`` to check
    (:data:`RESUME_KEYS`): the SHA-256 of the model file and of ``--weights``, and the
    options."""
    return {"model_sha256": model_sha256, "weights_sha256": weights_sha256,
            "threshold": threshold, "overlays": overlays, "save_maps": save_maps}


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


def csv_rows(rows: Sequence[Sequence]) -> str:
    """CSV lines (``\\n`` line ends) of ``rows`` as they are.

    The csv module quotes a cell holding a line end only when it is the writer's line
    terminator (``\\n``), so a bare carriage return in a file name would end a line for
    most readers; a row holding one is written with every cell quoted.
    """
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        cr = any(isinstance(v, str) and "\r" in v for v in row)
        (quoted if cr else plain).writerow(row)
    return buf.getvalue()


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A CSV table as text (``\\n`` line ends), with formula-like cells neutralised
    (:func:`safe_cell`)."""
    return csv_rows([[safe_cell(v) for v in row] for row in [header, *rows]])


def write_scores(out: Path, model_file: str, scores: dict[str, float],
                 inputs: Sequence[Path], threshold: float | None, skipped: list[str],
                 run: dict | None = None) -> int:
    """score's ``scores.csv`` and ``scores.json``, in input order; then the resume
    journal, which they replace, is removed.

    Args:
        out: output folder.
        model_file: the model, as named on the command line.
        scores: image score by file name (this run's and a resumed run's).
        inputs: every input image, in order (those without a score are left out).
        threshold: image score from which an image is labelled anomalous, or None.
        skipped: the files left out (unreadable, unsupported, ...).
        run: the run's record (model hash, options), kept for ``--resume``.

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
        {"model": model_file, "threshold": threshold, "run": run, "images": records,
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

#: First line of the journal, followed by the JSON of the run it belongs to.
JOURNAL_TAG = "# patchcore-fast score journal "

#: The parts of a run record that must agree for ``--resume`` to add to earlier results.
#: The threshold is recorded but may change: it labels every row when scores.csv is
#: written, so a resumed run labels old and new rows alike.
RESUME_KEYS = {"model_sha256": "the model file's SHA-256", "weights_sha256":
               "the --weights file's SHA-256", "overlays": "overlays (--no-overlays)",
               "save_maps": "--save-maps"}


def _check_run(source: Path, earlier: object, run: dict) -> None:
    if not isinstance(earlier, dict):
        raise PatchCoreError(f"--resume: {source} does not say which model and options "
                             f"produced it (written by an older version?); score into another "
                             f"folder or without --resume")
    for key, what in RESUME_KEYS.items():
        if earlier.get(key) != run.get(key):
            raise PatchCoreError(f"--resume: {source} was written with other settings "
                                 f"({what}: {earlier.get(key)} then, {run.get(key)} now); "
                                 f"score into another folder or without --resume")


def read_done(out: Path, run: dict) -> dict[str, float]:
    """Scores already in ``out`` (a finished run's scores.json and/or the journal of a
    killed one), after checking that they come from the same model and options.

    A journal line cut short by a kill or a full disk (no newline yet) is ignored: that
    image is scored again. An empty journal (a run that died before its header reached the
    disk) holds nothing and is started again.

    Args:
        out: output folder.
        run: this run's record (:data:`RESUME_KEYS` and the threshold).

    Raises:
        PatchCoreError: the earlier results belong to another model or other options, or
            are not this tool's files; one line.
    """
    done: dict[str, float] = {}
    finished = out / "scores.json"
    if finished.is_file():
        try:
            data = json.loads(finished.read_text(encoding="utf-8"))
            _check_run(finished, data.get("run"), run)
            done.update({str(r["file"]): float(r["score"]) for r in data["images"]})
        except PatchCoreError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise PatchCoreError(f"--resume: {finished} is not a scores file of patchcore-fast; "
                                 f"score into another folder or without --resume") from None
    journal = out / JOURNAL
    if journal.is_file():
        # Bytes, not read_text: its newline translation would break a name holding "\r".
        text = journal.read_bytes().decode("utf-8", errors="replace")
        text = text[:text.rfind("\n") + 1]  # drop a line cut short
        if text:
            head, _, rest = text.partition("\n")
            if not head.startswith(JOURNAL_TAG):
                raise PatchCoreError(f"--resume: {journal} has no header naming its model "
                                     f"(written by an older version?); delete it to score "
                                     f"everything again")
            try:
                earlier = json.loads(head[len(JOURNAL_TAG):])
            except ValueError:
                earlier = None
            _check_run(journal, earlier, run)
            for row in csv.DictReader(io.StringIO(rest)):
                try:
                    done[row["file"]] = float(row["score"])
                except (KeyError, TypeError, ValueError):
                    raise PatchCoreError(f"--resume: {journal} is damaged (row {row}); "
                                         f"delete it to score everything again") from None
    return done


class Journal:
    """score's record of finished images (``OUTDIR/.scores.partial.csv``).

    An image enters the journal once its files are written, so a killed run resumes exactly
    where its outputs stop. The file is made at the first record: a header line with the
    run's record (model hash, options; see :func:`read_done`) and the CSV header, written
    and ``fsync``-ed before any row. Each record is appended and ``fsync``-ed: a killed run
    or a full disk costs at most the line being written, which the reader drops and which
    is cut off before the next append; a journal left without its whole header (empty, or
    cut inside it) holds no row and is started again. Use it under
    ``contextlib.closing``.

    Args:
        out: output folder.
        resume: append to the journal of an earlier run instead of starting a new one.
        run: this run's record (JSON-serialisable).
        keep: False records nothing (the ranks of a distributed run, which keep none).
    """

    def __init__(self, out: Path, resume: bool, run: dict | None = None, keep: bool = True):
        self.out, self.resume, self.run, self.keep = out, resume, run or {}, keep
        self._file = None

    def _open(self) -> None:
        path = self.out / JOURNAL
        data = b""
        if self.resume and path.is_file():
            data = path.read_bytes()
            data = data[:data.rfind(b"\n") + 1]  # a line left unfinished by a kill
        if data.count(b"\n") < 2:  # new, or without a whole header: start it (again)
            self.out.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write((JOURNAL_TAG + json.dumps(self.run, sort_keys=True)
                          + "\nfile,score\n").encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_folder(self.out)
        else:  # read_done has checked the header: cut the unfinished line, then append
            os.truncate(path, len(data))
        self._file = open(path, "ab")

    def record(self, scores: Sequence[tuple[Path, float]]) -> None:
        """Add (image, score) rows and make them durable (``fsync``)."""
        if not self.keep:
            return
        try:
            if self._file is None:
                self._open()
            self._file.write(csv_rows([[str(p), s] for p, s in scores]).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise PatchCoreError(f"cannot write {self.out / JOURNAL}: "
                                 f"{exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file (idempotent); the journal stays for ``--resume`` until
        :func:`write_scores` replaces it."""
        if self._file is not None:
            self._file.close()
            self._file = None
