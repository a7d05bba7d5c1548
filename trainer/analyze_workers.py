"""``bf analyze --workers N``: the layers spread over N processes on one machine.

A small model is bound by kernel launches, not by the GPU: one process keeps an H100
mostly idle, so N processes each analysing every N-th layer run close to N times
faster. Each worker is this module run as a program on a request file (the analysis
request plus its shard and part file), writes its own part file (resumable like any
analysis); when all have finished the parts are merged into ``--out`` and removed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bf.atomic import atomic_path
from bf.errors import BfError
from bf.processes import run_commands
from bf.trainer.analyze import AnalyzeConfig, merge_analyses, write_analysis


@dataclass(frozen=True)
class AnalyzeJob:
    """What every worker analyses: the model (its directory and the identity recorded in the
    analysis), the settings and the device."""

    model_dir: str
    model: dict  # {"path", "hash"}, as recorded in the analysis
    cfg: AnalyzeConfig
    device: str


def part_path(out: Path, k: int, n: int) -> Path:
    return out.with_name(f"{out.name}.part{k}of{n}")


def _layers(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return set()  # not written yet (writes are atomic renames)


def _write_request(path: Path, job: AnalyzeJob, k: int, n: int, part: Path, resume: bool) -> None:
    cfg = {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(job.cfg).items()}
    request = {**asdict(job), "cfg": cfg, "shard": [k, n], "out": str(part), "resume": resume}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(request, indent=1))


def run_workers(
    job: AnalyzeJob,
    n: int,
    out: Path,
    resume: bool,
    progress: Callable[[int], None] = lambda done: None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Analyse ``job`` in ``n`` processes at once, report layers done, merge into ``out``.

    Whether ``out`` may be continued is checked by the caller (``analyze.check_resumable``).
    """
    parts = [part_path(out, k, n) for k in range(n)]
    logs = {str(k): p.with_name(p.name + ".log") for k, p in enumerate(parts)}
    requests = [p.with_name(p.name + ".request.json") for p in parts]
    leftovers = sorted(out.parent.glob(f"{out.name}.part*of*[0-9]"))
    if leftovers and not resume:
        raise BfError(f"{leftovers[0]} is left from an interrupted analysis; pass --resume to continue it, or delete it")
    stale = [p for p in leftovers if p not in parts]  # from a run with another --workers: merged at the end
    for request in out.parent.glob(f"{out.name}.part*of*.request.json"):  # a killed run's; every run writes its own
        request.unlink()
    if out.exists():  # every worker continues from what is already merged (and refuses it if the settings differ)
        for part in parts:
            if not part.exists():
                write_analysis(part, json.loads(out.read_text()))

    def done() -> int:  # parts resumed from --out all hold its layers: count each layer once
        return len(set().union(*(_layers(p) for p in parts)))

    commands = {}
    for k, (part, request) in enumerate(zip(parts, requests, strict=True)):
        _write_request(request, job, k, n, part, part.exists())
        commands[str(k)] = [sys.executable, "-m", "bf.trainer.analyze_workers", str(request)]
    log(f"{n} workers started (logs: {logs['0'].name} ...)")
    try:
        run_commands(
            commands,
            logs,
            n,
            on_poll=lambda: progress(done()),
            failure=lambda k, line, lg: f"analysis worker {k} of {n} failed: {line} (log: {lg}); fix it, then rerun with --resume",
            poll_seconds=2.0,
        )
    finally:
        for r in requests:
            r.unlink(missing_ok=True)
    sources = ([out] if out.exists() else []) + stale + parts
    merged = merge_analyses([(str(p), json.loads(p.read_text())) for p in sources])
    write_analysis(out, merged)
    for p in stale + parts + list(logs.values()):
        p.unlink(missing_ok=True)
    return merged


def _work(request_path: Path) -> None:
    """One worker: the request's shard of the analysis into its part file, progress as log lines."""
    from bf.models.diffusers_pipeline import load_model
    from bf.trainer.analyze import analyze

    request = json.loads(request_path.read_text())
    cfg = AnalyzeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["cfg"].items()})
    loaded = load_model(Path(request["model_dir"]), scheduler=cfg.scheduler, device=request["device"])

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    analyze(loaded.pipe, request["model"], cfg, Path(request["out"]), request["resume"], shard=tuple(request["shard"]),
            progress=lambda done, total, name: say(f"{done}/{total} {name}"), log=say)  # fmt: skip


if __name__ == "__main__":
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    try:
        _work(Path(sys.argv[1]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the last line of the log is what the parent quotes: make it the error, after the traceback
        if not isinstance(e, BfError):
            import traceback

            traceback.print_exc()
        print(f"error: {e}" if isinstance(e, BfError) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
