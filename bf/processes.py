"""Commands run side by side on one machine, each with its own log file.

Used where one process cannot keep the machine busy (a small model is bound by kernel
launches): ``bf analyze --workers`` and the ablation script. The CPU threads are split
between the processes so that they do not oversubscribe the cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bf.errors import BfError


def last_line(log: Path) -> str:
    lines = [ln.removeprefix("error: ") for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def run_commands(
    jobs: dict[str, list[str]],
    logs: dict[str, Path],
    parallel: int,
    *,
    on_poll: Callable[[], None] = lambda: None,
    on_event: Callable[[str, str, float], None] = lambda key, event, seconds: None,
    failure: Callable[[str, str, Path], str] = lambda key, line, log: f"{key} failed: {line} (log: {log})",
    extra_env: dict[str, str] | None = None,
    poll_seconds: float = 1.0,
) -> dict[str, float]:
    """Run ``jobs`` (key -> argv), at most ``parallel`` at once; seconds per job.

    The first failure stops the others at once and raises a BfError worded by ``failure``
    from the key, the last line of its log and the log's path.
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(parallel, len(jobs)))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **(extra_env or {})}
    pending, running, seconds = list(jobs.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                key, argv = pending.pop(0)
                with open(logs[key], "w") as f:
                    running[key] = (subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env), time.time())
                on_event(key, "started", 0.0)
            for key, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                if proc.returncode != 0:
                    raise BfError(failure(key, last_line(logs[key]), logs[key]))
                seconds[key] = time.time() - t0
                on_event(key, "done", seconds[key])
            on_poll()
            if pending or running:
                time.sleep(poll_seconds)
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return seconds
