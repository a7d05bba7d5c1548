"""The ``bf`` command line: the only place where the stages are wired together.

One module per command (``<command>_cmd.py``): it parses, checks its input before any
expensive work, builds the stage's request, calls the stage and reports. ``app`` holds the
group and the error handling, ``checks`` the input checks, ``options`` the shared options,
``output`` log and progress lines, ``cached_exports`` the exports bf makes for itself.
"""

from bf.cli.app import main

__all__ = ["main"]
