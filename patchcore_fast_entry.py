"""The ``patchcore-fast`` console script: Ctrl-C is handled before the heavy imports.

Importing :mod:`patchcore_fast` imports torch and loads the compiled kernels (a second or
more), and Python's own SIGINT handler would turn a Ctrl-C during that time into a long
traceback. This module lives outside the package, so that importing it imports nothing
heavy: it installs a handler that ends the process with one line and exit code 130, then
imports the command. Once the command is imported, Ctrl-C raises ``KeyboardInterrupt``
again, so that the command's ``finally`` blocks remove their temporary files before
:func:`patchcore_fast.cli.main` prints the same line and returns 130.
"""

import os
import signal
import sys

_LINE = b"patchcore-fast: interrupted\n"


def _interrupted(signum, frame):  # pragma: no cover - runs in the interrupted process
    # Nothing has been written yet (or the command has returned): no cleanup to run, so
    # leave at once, without unwinding through a half-imported module.
    try:
        os.write(2, _LINE)
    except OSError:  # stderr closed, or a pipe whose reader has left
        pass
    os._exit(130)


def main() -> int:
    """Entry point of the console script (see :func:`patchcore_fast.cli.main`)."""
    signal.signal(signal.SIGINT, _interrupted)
    # Standard descriptors closed by the caller (2>&-) get /dev/null before the imports
    # open any file, which would otherwise take descriptor 2 (cli.main does it again).
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)
    from patchcore_fast.cli import process_main as command

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return command()
    finally:
        signal.signal(signal.SIGINT, _interrupted)  # interpreter shutdown: no traceback


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
