"""Progress lines when stderr is not a terminal (logs, CI, pipes)."""

import io

from bf import progress
from bf.progress import LogProgress, progress_bar


def test_log_progress_writes_count_rate_and_time_left(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = LogProgress(desc="sampling", total=4, unit="UNet call", file=out)
    bar.update(1)
    bar.set_postfix(loss="0.25")
    bar.update(1)
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("sampling: 1/4 UNet calls, ") and "left" in lines[0]
    assert lines[1].startswith("sampling: 2/4 UNet calls, ") and lines[1].endswith("loss=0.25")
    assert lines[2].startswith("sampling: 2/4 UNet calls, ") and "done in 0:00" in lines[2]


def test_the_rate_and_time_left_leave_out_a_slow_first_item(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    clock = iter([0.0, 100.0, 101.0, 102.0])  # the first item takes 100 s (a model loaded), the next ones 1 s each
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LogProgress(desc="eval", total=10, unit="img", file=out)
    bar.update(1)
    bar.update(1)
    bar.update(1)
    lines = out.getvalue().splitlines()
    assert "about 15:00 left" in lines[0]  # one item: the only rate there is, 1 per 100 s
    assert lines[2] == "eval: 3/10 imgs, 1/s, elapsed 1:42, about 0:07 left"  # not 3 per 102 s: 3:58 left


def test_lines_are_spaced_by_the_interval_and_iterables_are_counted(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 3600.0)
    out = io.StringIO()
    assert list(progress_bar(range(5), desc="quantize", unit="layer", file=out, disable=None)) == [0, 1, 2, 3, 4]
    assert len(out.getvalue().splitlines()) == 1  # no line within the hour, then the closing one
    assert out.getvalue().startswith("quantize: 5/5 layers, ") and "done in" in out.getvalue()


def test_a_bar_without_a_unit_counts_plainly(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = progress_bar(total=6, desc="export", file=out, bar_format="{desc}: {n}/{total} {postfix}")
    bar.set_postfix_str("tracing unet")
    bar.update(2)
    assert out.getvalue().startswith("export: 2/6, ") and out.getvalue().rstrip().endswith("tracing unet")
