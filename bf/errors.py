"""The one exception type that reaches a user as a single line (see bf.cli)."""


class BfError(Exception):
    """A problem the user can fix: bad input, missing file, wrong version.

    The message must say what is wrong and what to do; the CLI prints it as one
    line without a traceback and exits non-zero.
    """


class FormatError(BfError):
    """A .bfq file (or packed buffer) that cannot be read as written by this format."""
