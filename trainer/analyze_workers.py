"""``bf analyze --workers N``: the layers spread over N processes on one machine.

A small model is bound by kernel launches, not by the GPU: one process keeps an H100
mostly idle, so N processes each analysing every N-th layer run close to N times
faster. Each worker writes its own part file (resumable like any analysis); when all
have finished the parts are merged into ``--out`` and removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from bf.errors import BfError
from bf.processes import run_commands
from bf.trainer.analyze import merge_analyses, write_analysis


def part_path(out: Path, k: int, n: int) -> Path:
    return out.with_name(f"{out.name}.part{k}of{n}")


def _layers(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return set()  # not written yet (writes are atomic renames)


def run_workers(
    command: Callable[[int, int, Path, bool], list[str]],
    n: int,
    out: Path,
    resume: bool,
    progress: Callable[[int], None] = lambda done: None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Run ``command(k, n, part, resume_part)`` for k < n at once, report layers done, merge into ``out``.

    Whether ``out`` may be continued is checked by the caller (``analyze.check_resumable``).
    """
    parts = [part_path(out, k, n) for k in range(n)]
    logs = {str(k): p.with_name(p.name + ".log") for k, p in enumerate(parts)}
    leftovers = sorted(out.parent.glob(f"{out.name}.part*of*[0-9]"))
    if leftovers and not resume:
        raise BfError(f"{leftovers[0]} is left from an interrupted analysis; pass --resume to continue it, or delete it")
    stale = [p for p in leftovers if p not in parts]  # from a run with another --workers: merged at the end
    if out.exists():  # every worker continues from what is already merged (and refuses it if the settings differ)
        for part in parts:
            if not part.exists():
                write_analysis(part, json.loads(out.read_text()))

    def done() -> int:  # parts resumed from --out all hold its layers: count each layer once
        return len(set().union(*(_layers(p) for p in parts)))

    log(f"{n} workers started (logs: {logs['0'].name} ...)")
    run_commands(
        {str(k): command(k, n, p, p.exists()) for k, p in enumerate(parts)},
        logs,
        n,
        on_poll=lambda: progress(done()),
        failure=lambda k, line, lg: f"analysis worker {k} of {n} failed: {line} (log: {lg}); fix it, then rerun with --resume",
        poll_seconds=2.0,
    )
    sources = ([out] if out.exists() else []) + stale + parts
    merged = merge_analyses([(str(p), json.loads(p.read_text())) for p in sources])
    write_analysis(out, merged)
    for p in stale + parts + list(logs.values()):
        p.unlink(missing_ok=True)
    return merged
