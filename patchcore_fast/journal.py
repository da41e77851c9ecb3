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
import os
from pathlib import Path
from typing import Sequence

from .errors import PatchCoreError
from .files import csv_rows, fsync_folder

#: score's progress, for ``--resume`` (removed when the run finishes).
JOURNAL = ".scores.partial.csv"


def run_record(model_sha256: str, weights_sha256: str | None, threshold: float | None,
               overlays: bool, save_maps: bool) -> dict:
    """What a score run's results depend on, kept with them for ``--resume`` to check
    (:data:`RESUME_KEYS`): the SHA-256 of the model file and of ``--weights``, and the
    options."""
    return {"model_sha256": model_sha256, "weights_sha256": weights_sha256,
            "threshold": threshold, "overlays": overlays, "save_maps": save_maps}


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
        :func:`~patchcore_fast.outputs.write_scores` replaces it."""
        if self._file is not None:
            self._file.close()
            self._file = None
