"""What every command prints besides its result: log lines and progress, both on stderr."""

from __future__ import annotations

import sys

import click


def log(msg: str) -> None:
    click.echo(msg, err=True)


def layer_progress(desc: str):
    """A per-layer progress wrapper for iterables (on a terminal a bar, in a log one line per update)."""
    from bf.progress import progress_bar

    return lambda it: progress_bar(it, desc=desc, unit="layer", disable=None, file=sys.stderr)


def progress_bar(**kwargs):
    from bf.progress import progress_bar as bar

    return bar(disable=None, file=sys.stderr, **kwargs)


def write_json(path, payload: dict) -> None:
    """``payload`` as indented JSON into ``path`` (atomically), or to stdout for ``-``."""
    import json

    text = json.dumps(payload, indent=1)
    if str(path) == "-":
        click.echo(text)
        return
    from bf.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    log(f"wrote {path}")
