"""The standard streams of a run: messages that can never break the work.

Messages and progress bars go to stderr. Whether anyone reads them must never decide
whether the work is kept: a reader that leaves (``2>&1 | head -c 100``) or a closed stderr
(``2>&-``) loses the messages, not the outputs or the exit code. The libraries' own
chatter (matplotlib's cache folder, the hub's retries) is not the tool's to show.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Iterator

#: Loggers of the libraries used, held at ERROR: their warnings (matplotlib's cache
#: folder and font cache, the hub's retries) are not the tool's messages.
QUIET_LOGGERS = ("matplotlib", "PIL", "huggingface_hub", "timm", "urllib3", "httpx")


class SafeStream(io.TextIOBase):
    """A standard stream that messages and progress bars can never break.

    A write that fails (the reader of a pipe has left: EPIPE; a closed stream) loses that
    message and every later one, not the run. The stream's descriptor is then pointed at
    /dev/null, so that the interpreter's final flush (which would make the exit code 120)
    and the C libraries' own writes succeed too.

    Args:
        stream: the stream to write to (None: a descriptor closed at start-up).
    """

    def __init__(self, stream):
        self._stream, self.lost = stream, stream is None

    def _lose(self) -> None:
        self.lost = True
        with contextlib.suppress(Exception):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lose()

    def isatty(self) -> bool:
        return not self.lost and bool(getattr(self._stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        if self.lost:
            raise io.UnsupportedOperation("the stream is gone")
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def open_closed_descriptors() -> None:
    """Point standard descriptors that were closed (``2>&-``) at /dev/null.

    Otherwise the next file the run opens gets descriptor 2, and everything written to
    "stderr" (by the C libraries too) lands in it: possibly an output file. ``os.open``
    takes the lowest free descriptor, so each closed one is filled in turn.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)


@contextlib.contextmanager
def guarded_streams() -> Iterator[None]:
    """A run's streams: closed descriptors filled (:func:`open_closed_descriptors`), the
    libraries' loggers held at ERROR (:data:`QUIET_LOGGERS`), stdout and stderr wrapped in
    :class:`SafeStream` (restored afterwards)."""
    open_closed_descriptors()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams
