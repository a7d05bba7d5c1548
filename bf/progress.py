"""Progress of long commands, on a terminal and in logs.

On a terminal: a tqdm bar. Anywhere else (a log file, CI, a pipe) a bar prints nothing useful,
so a line is written every few seconds instead: count, total, rate and time left, and a last
line when the work ends. The rate counts from the first item done: the first item's time often holds
a one-off start (a model loaded, a kernel compiled), which would make every later estimate too long.
``BF_PROGRESS_SECONDS`` sets the interval (default 5).
"""

from __future__ import annotations

import os
import sys
import time

INTERVAL_S = float(os.environ.get("BF_PROGRESS_SECONDS", "5"))


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LogProgress:
    """The part of tqdm's interface bf uses, as periodic log lines."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, unit: str = "", initial: int = 0, file=None, **_):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.file = file or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.first = None  # (time, count) at the first item done
        self.closed = False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.first is None and self.n > self.start_n:
            self.first = (now, self.n)
        if now - self.last >= INTERVAL_S:
            self.last = now
            self._line(now)

    def refresh(self) -> None:
        """After ``n`` was set directly: a line if the interval has passed."""
        self.update(0)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        if self.first is not None and self.n > self.first[1] and now > self.first[0]:
            rate = (self.n - self.first[1]) / (now - self.first[0])
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        units = f" {self.unit}{'' if self.unit.endswith('s') else 's'}" if self.unit else ""  # tqdm's "it" reads as nothing here
        parts = [f"{self.desc}: {count}{units}", f"{rate:.3g}/s"]
        if done:
            parts.append(f"done in {duration(elapsed)}")
        else:
            parts.append(f"elapsed {duration(elapsed)}")
            if self.total and rate > 0:
                parts.append(f"about {duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line(time.monotonic(), done=True)


def progress_bar(iterable=None, **kwargs):
    """tqdm on a terminal, periodic log lines elsewhere (same keyword arguments as tqdm)."""
    file = kwargs.pop("file", None) or sys.stderr
    if file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, file=file, **kwargs)
    kwargs.pop("disable", None)
    kwargs.pop("bar_format", None)
    return LogProgress(iterable, file=file, **kwargs)
