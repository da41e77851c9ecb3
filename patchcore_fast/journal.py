"""score's resume journal: which images a run has finished, for ``score --resume``.

An image enters the journal once its files are written, so a killed run resumes exactly
where its outputs stop; the run's record (model and weights hashes, options) heads the
journal and the finished ``scores.json``, and ``--resume`` adds to earlier results only
when it matches (:func:`read_done`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

from .errors import InputWarning, PatchCoreError
from .files import csv_rows, fsync_folder, text_name

#: score's progress, for ``--resume`` (removed when the run finishes).
JOURNAL = ".scores.partial.csv"


def run_record(model_sha256: str, weights_sha256: str | None, threshold: float | None,
               overlays: bool, save_maps: bool, save_masks: bool = False,
               min_region_area: int = 0, overlay_format: str = "png") -> dict:
    """What a score run's results depend on, kept with them for ``--resume`` to check
    (:data:`RESUME_KEYS`): the SHA-256 of the model file and of ``--weights``, and the
    options."""
    return {"model_sha256": model_sha256, "weights_sha256": weights_sha256,
            "threshold": threshold, "overlays": overlays, "save_maps": save_maps,
            "save_masks": save_masks, "min_region_area": min_region_area,
            "overlay_format": overlay_format}


#: The journal's column of each image's regions (compact JSON; empty without them): not
#: scores.csv's ``regions``, which counts them.
REGIONS = "region_list"

#: First line of the journal, followed by the JSON of the run it belongs to.
JOURNAL_TAG = "# patchcore-fast score journal "

#: The parts of a run record that must agree for ``--resume`` to add to earlier results.
#: The threshold is recorded but may change: it labels every row when scores.csv is
#: written, so a resumed run labels old and new rows alike.
RESUME_KEYS = {"model_sha256": "the model file's SHA-256", "weights_sha256":
               "the --weights file's SHA-256", "overlays": "overlays (--no-overlays)",
               "save_maps": "--save-maps", "save_masks": "--save-masks",
               "min_region_area": "--min-region-area", "overlay_format": "--overlay-format"}
#: What a record written before a key existed meant by its absence.
_BEFORE = {"save_masks": False, "min_region_area": 0, "overlay_format": "png"}


def _check_run(source: Path, earlier: object, run: dict) -> None:
    if not isinstance(earlier, dict):
        raise PatchCoreError(f"--resume: {source} does not say which model and options "
                             f"produced it (written by an older version?); score into another "
                             f"folder or without --resume")
    for key, what in RESUME_KEYS.items():
        then, now = earlier.get(key, _BEFORE.get(key)), run.get(key, _BEFORE.get(key))
        if then != now:
            raise PatchCoreError(f"--resume: {source} was written with other settings "
                                 f"({what}: {then} then, {now} now); "
                                 f"score into another folder or without --resume")


def read_done(out: Path, run: dict, regions: dict | None = None) -> dict[str, float]:
    """Scores already in ``out`` (a finished run's scores.json and/or the journal of a
    killed one), after checking that they come from the same model and options.

    A journal line cut short by a kill or a full disk (no newline yet) is ignored: that
    image is scored again. An empty journal (a run that died before its header reached the
    disk) holds nothing and is started again. A score that is not a finite number (``nan``,
    ``1e999``, JSON's ``NaN``: no run of this tool writes one) is not a result: that
    image is named in a warning and scored again.

    Args:
        out: output folder.
        run: this run's record (:data:`RESUME_KEYS` and the threshold).
        regions: if given, gets the defect regions of each returned file that the earlier
            run recorded (a calibrated model's).

    Raises:
        PatchCoreError: the earlier results belong to another model or other options, or
            are not this tool's files; one line.
    """
    found: dict[str, tuple[float, Path]] = {}  # the last score of each file, and where
    areas: dict[str, list | None] = {}

    def keep(source: Path, file: str, score: float, where: list | None) -> None:
        found.pop(file, None)
        found[file] = score, source
        areas[file] = where

    finished = out / "scores.json"
    if finished.is_file():
        try:
            data = json.loads(finished.read_text(encoding="utf-8"))
            _check_run(finished, data.get("run"), run)
            for r in data["images"]:
                where = r.get("regions")
                if not (where is None or isinstance(where, list)):
                    raise ValueError("regions should be a list")
                keep(finished, str(r["file"]), float(r["score"]), where)
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
                    file, score = row["file"], float(row["score"])
                    # A journal of a version before regions has no such column.
                    where = json.loads(row[REGIONS]) if row.get(REGIONS) else None
                    if not (where is None or isinstance(where, list)):
                        raise ValueError(f"{REGIONS} should be a JSON list")
                except (KeyError, TypeError, ValueError):
                    raise PatchCoreError(f"--resume: {journal} is damaged (row {row}); "
                                         f"delete it to score everything again") from None
                keep(journal, file, score, where)
    for file, (score, source) in found.items():
        if not math.isfinite(score):
            warnings.warn(f"--resume: {source} gives {file} the score {score}, not a finite "
                          f"number: it is scored again", InputWarning, stacklevel=2)
    done = {file: score for file, (score, _) in found.items() if math.isfinite(score)}
    if regions is not None:
        regions.update((file, areas[file]) for file in done)
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
                          + f"\nfile,score,{REGIONS}\n").encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_folder(self.out)
        else:  # read_done has checked the header: cut the unfinished line, then append
            os.truncate(path, len(data))
        self._file = open(path, "ab")

    def record(self, scores: Sequence[tuple]) -> None:
        """Add (image, score) or (image, score, regions) rows and make them durable
        (``fsync``); regions (a list of dicts, or None) are kept as compact JSON."""
        if not self.keep:
            return
        try:
            if self._file is None:
                self._open()
            self._file.write(csv_rows(
                [[text_name(r[0]), r[1], "" if len(r) < 3 or r[2] is None
                  else json.dumps(r[2], separators=(",", ":"))] for r in scores]
            ).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise PatchCoreError(f"cannot write {self.out / JOURNAL}: "
                                 f"{exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file (idempotent); the journal stays for ``--resume`` until
        :func:`~patchcore_fast.outputs.write_scores` replaces it."""
        if self._file is not None:
            self._file.close()
            self._file = None
