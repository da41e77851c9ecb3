"""The one error type that the command line turns into a single line and exit code 2."""


class PatchCoreError(Exception):
    """A problem with the user's input, data, model file or machine (not a bug).

    The message is one line that says what is wrong and, where possible, what to do.
    """


class SkippedFileWarning(UserWarning):
    """An input file that could not be read and was left out (the message names it)."""


class LargeImageWarning(UserWarning):
    """An image so elongated that only the region behind its crop is resized (the message
    names it and says how much of it the model sees)."""
