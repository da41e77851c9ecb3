"""The one error type that the command line turns into a single line and exit code 2."""


class PatchCoreError(Exception):
    """A problem with the user's input, data, model file or machine (not a bug).

    The message is one line that says what is wrong and, where possible, what to do.
    """


class SkippedFileWarning(UserWarning):
    """An input file that could not be read and was left out (the message names it)."""


class InputWarning(UserWarning):
    """An input (a file or a setting) that is used, with something the user should know
    (the message names it): a file name that is not UTF-8, a file given twice, a mask that
    is missing, lossy or marks nothing, ``--workers`` above the CPUs."""


class LargeImageWarning(UserWarning):
    """An image so elongated that only the region behind its crop is resized (the message
    names it and says how much of it the model sees)."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, else its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def os_error_text(exc: OSError) -> str:
    """An OS error in words, ``strerror: filename`` (e.g. ``Permission denied: out/a.csv``);
    its message instead when the OS gave no ``strerror``."""
    filename = getattr(exc, "filename", None)
    return (exc.strerror or str(exc)) + (f": {filename}" if filename else "")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError``
    (CUDA) or the CPU allocator's RuntimeError ("can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
