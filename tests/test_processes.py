"""Side-by-side commands: logs, seconds per job, and the first failure stopping the rest."""

import sys
import time

import pytest

from bf.errors import BfError
from bf.processes import run_commands


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_jobs_run_with_their_own_logs_and_thread_share(tmp_path):
    jobs = {k: _py("import os; print('threads', os.environ['OMP_NUM_THREADS'])") for k in ("a", "b", "c")}
    logs = {k: tmp_path / f"{k}.log" for k in jobs}
    events = []
    seconds = run_commands(jobs, logs, 2, on_event=lambda k, e, s: events.append((k, e)), poll_seconds=0.05)
    assert sorted(seconds) == ["a", "b", "c"] and all(s > 0 for s in seconds.values())
    assert all(logs[k].read_text().startswith("threads ") for k in jobs)
    assert events.index(("c", "started")) > min(events.index(("a", "done")), events.index(("b", "done")))  # at most 2 at once


def test_first_failure_stops_the_others_and_names_the_log(tmp_path):
    jobs = {"slow": _py("import time; time.sleep(60)"), "bad": _py("import sys; print('error: disk is full'); sys.exit(3)")}
    logs = {k: tmp_path / f"{k}.log" for k in jobs}
    t0 = time.time()
    with pytest.raises(BfError, match=r"^bad failed: disk is full \(log: .*bad\.log\)$"):
        run_commands(jobs, logs, 2, poll_seconds=0.05)
    assert time.time() - t0 < 30  # the sleeping job was terminated, not waited for
