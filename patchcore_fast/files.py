"""Files: atomic outputs (a reader never sees half a file, a failed run leaves none) and
anonymous temporary spools for results too large to keep in memory."""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import PatchCoreError


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _why(exc: OSError, tmp: str | None) -> str:
    """An OS error in words, naming the file involved unless it is our temporary file."""
    text = exc.strerror or str(exc) or type(exc).__name__
    other = getattr(exc, "filename", None)
    if other is not None and str(other) != str(tmp):
        text += f" ({other})"
    return text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it onto ``path`` on success.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one
    file system (atomic). If the body raises, the temporary file is removed and ``path``
    is left as it was. The file gets the mode a plain ``open()`` would give it (0666 less
    the umask), not ``mkstemp``'s 0600, so that a shared folder stays shared.

    Args:
        path: final location of the file.

    Yields:
        Path of the temporary file to write.

    Raises:
        PatchCoreError: the folder or the file cannot be created or written (disk full,
            permission denied, read-only file system, a folder where the file goes): one
            line naming ``path``; nothing is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PatchCoreError(f"cannot create the folder {path.parent} for {path.name}: "
                             f"{_why(exc, None)}") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield Path(tmp)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder of that name is in the way")
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise PatchCoreError(f"cannot write {path}: {_why(exc, tmp)}") from None
        raise


def fsync_folder(path: str | os.PathLike) -> None:
    """Make a rename or a new file in ``path`` durable (where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class ArraySpool:
    """Equal-shaped arrays parked in an anonymous temporary file, read back by index.

    For data too large to hold in memory: the full-width training features of the
    bounded-memory fit, the anomaly maps of a whole test set, test embeddings reused at
    several coreset ratios. The file is created at the first :meth:`append`, unlinked from
    the start (the operating system removes it even when the run is killed) and read with
    ``pread`` (page cache, not the process's resident memory).

    Args:
        shape: shape of one item, e.g. ``(crop, crop)``.
        dtype: numpy dtype of the items.
        temp_dir: folder of the file (default: $TMPDIR).
        what: the file's name in error messages ("temporary <what>").
    """

    def __init__(self, shape: tuple[int, ...], dtype=np.float32,
                 temp_dir: str | os.PathLike | None = None, what: str = "spool file"):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.item_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.temp_dir = temp_dir
        self.what = what
        self.count = 0
        self._file = None

    def append(self, items: np.ndarray) -> None:
        """Add items (array[B, *shape]) after the ones already there."""
        items = np.ascontiguousarray(items, dtype=self.dtype)
        if items.shape[1:] != self.shape:
            raise ValueError(f"items should be [B, {', '.join(map(str, self.shape))}], got "
                             f"{list(items.shape)}")
        where = self.temp_dir or tempfile.gettempdir()
        # The way out that the user controls: --temp-dir when it was given, else $TMPDIR.
        other = ("choose another folder with --temp-dir" if self.temp_dir is not None
                 else "set TMPDIR (or --temp-dir)")
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(prefix="patchcore-fast-",
                                                    dir=self.temp_dir)
            except OSError as exc:
                raise PatchCoreError(f"cannot create the temporary {self.what} in {where}: "
                                     f"{exc.strerror or exc}; {other} to a writable "
                                     f"folder") from None
        try:
            self._file.write(memoryview(items).cast("B"))
        except OSError as exc:
            raise PatchCoreError(
                f"cannot write the temporary {self.what} ({self.count * self.item_bytes:,} "
                f"bytes written, {items.nbytes:,} more needed) in {where}: "
                f"{exc.strerror or exc}; {other} to a folder with more space") from None
        self.count += len(items)

    def read(self, start: int, stop: int | None = None, out: np.ndarray | None = None
             ) -> np.ndarray:
        """Items ``start`` to ``stop`` (default: just ``start``), one ``pread``.

        Args:
            start, stop: item range.
            out: C-contiguous array[stop - start, *shape] to fill (default: a new one).

        Returns:
            array[stop - start, *shape].
        """
        stop = start + 1 if stop is None else stop
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"items [{start}, {stop}) out of range [0, {self.count})")
        if out is None:
            out = np.empty((stop - start, *self.shape), dtype=self.dtype)
        if stop == start:
            return out
        self._file.flush()
        view, got, offset = memoryview(out).cast("B"), 0, start * self.item_bytes
        while got < len(view):
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if n <= 0:
                raise PatchCoreError(f"the temporary {self.what} is shorter than written "
                                     f"(was it removed or truncated?)")
            got += n
        return out

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """All items in order, ``size`` at a time."""
        for lo in range(0, self.count, size):
            yield self.read(lo, min(lo + size, self.count))

    def close(self) -> None:
        """Remove the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ArraySpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MapSpool:
    """Arrays of varying shapes (one anomaly map per photo, at the photo's own size) parked
    in one :class:`ArraySpool` of bytes, read back by index.

    Args:
        dtype: numpy dtype of the arrays.
        temp_dir: folder of the file (default: $TMPDIR).
        what: the file's name in error messages.
    """

    def __init__(self, dtype=np.float32, temp_dir: str | os.PathLike | None = None,
                 what: str = "map file"):
        self.dtype = np.dtype(dtype)
        self._bytes = ArraySpool((1,), np.uint8, temp_dir, what)
        self._where: list[tuple[int, tuple[int, ...]]] = []  # (first byte, shape)

    @property
    def count(self) -> int:
        """Arrays appended so far."""
        return len(self._where)

    def append(self, items: Sequence[np.ndarray]) -> None:
        """Add arrays (any shapes) after the ones already there."""
        for a in items:
            a = np.ascontiguousarray(a, dtype=self.dtype)
            self._where.append((self._bytes.count, a.shape))
            self._bytes.append(a.reshape(-1).view(np.uint8)[:, None])

    def read(self, start: int, stop: int | None = None) -> list[np.ndarray]:
        """Arrays ``start`` to ``stop`` (default: just ``start``), as a list."""
        stop = start + 1 if stop is None else stop
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"items [{start}, {stop}) out of range [0, {self.count})")
        out = []
        for first, shape in self._where[start:stop]:
            n = int(np.prod(shape)) * self.dtype.itemsize
            raw = self._bytes.read(first, first + n)
            out.append(raw.reshape(-1).view(self.dtype).reshape(shape))
        return out

    def close(self) -> None:
        """Remove the file (idempotent)."""
        self._bytes.close()

    def __enter__(self) -> "MapSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----- where outputs may go ---------------------------------------------------------------

def _existing_ancestor(path: Path) -> Path:
    """The deepest part of ``path`` that exists (``path`` itself if it does)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_outputs(option: str, out: str | os.PathLike, files: Sequence[str | os.PathLike],
                  read_folders: Sequence[str | os.PathLike] = (),
                  read_files: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, output files that would go where they must not.

    Every path is resolved (``..`` and symbolic links followed) first, so a category name
    or a link cannot lead a write somewhere else. Only the folders are resolved (a few
    ``stat`` calls however many files): the file names below them are the tool's own.

    Args:
        option: the option naming the output, for messages (e.g. ``"-o out/"``).
        out: the output location: every file must resolve inside it (or be it).
        files: every file the run may write.
        read_folders: folders whose files the run reads: no output may go inside one.
        read_files: files the run reads (images, model, weights): none may be overwritten.

    Raises:
        PatchCoreError: the first problem, in one line naming the option and the path.
    """
    base = Path(out).resolve()
    folders = [Path(f).resolve() for f in read_folders]
    inputs = {Path(f).resolve() for f in read_files}
    for folder in folders:
        if base == folder or base.is_relative_to(folder):
            raise PatchCoreError(f"{option}: the output {out} is inside the input folder "
                                 f"{folder}; write the results somewhere else")
    parents: dict[Path, Path] = {}
    for f in files:
        f = Path(f)
        parent = parents.get(f.parent)
        if parent is None:
            parent = parents[f.parent] = f.parent.resolve()
        target = parent / f.name
        if not (target == base or target.is_relative_to(base)):
            raise PatchCoreError(f"{option}: {f} would be written outside {out}")
        if target in inputs:
            raise PatchCoreError(f"{option}: {f} would overwrite the input file {target}; "
                                 f"write the results somewhere else")
        for folder in folders:
            if parent == folder or parent.is_relative_to(folder):
                raise PatchCoreError(f"{option}: {f} would be written into the input folder "
                                     f"{folder}; write the results somewhere else")
    for parent in set(parents.values()):
        found = _existing_ancestor(parent)
        if not found.is_dir():
            raise PatchCoreError(f"{option}: {found} is a file, not a folder")
        if not os.access(found, os.W_OK | os.X_OK):
            raise PatchCoreError(f"{option}: cannot write in {found}: permission denied")
    for f in files:
        target = parents[Path(f).parent] / Path(f).name
        if target.is_dir():
            raise PatchCoreError(f"{option}: {f} is a folder where that file goes; remove "
                                 f"it or choose another output")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (identifies local weights inside the model file, and the model
    and weights of a ``score --resume`` run).

    Memoised per file identity: (device, inode, size, modification time in ns) of the
    resolved path. One ``score --weights FILE`` used to hash the weights file three times
    (loading the model, building the backbone, the resume record): 0.18 s each for
    WideResNet-50's 270 MB here. A file rewritten in place keeps its inode but not its
    size and time, and an atomic replace gives a new inode; only a rewrite to the same size
    within one tick of the file system's clock (a few ms) could be missed, within a run.
    """
    st = os.stat(path)
    return _sha256((os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _sha256(identity: tuple) -> str:
    digest = hashlib.sha256()
    with open(identity[0], "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
