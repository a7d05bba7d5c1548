"""Atomic writes: a reader never sees a half-written file or directory.

Temporaries are named ``.<name>.<pid>-<random>.tmp`` beside the final path. A process killed
(SIGKILL) before it could clean up leaves one behind; the next write of the same path removes
those whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    # The umask can only be read by setting it; 0o077 meanwhile only makes other threads' new files stricter.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(final: Path) -> list[Path]:
    """Temporaries of ``final`` left by processes that no longer run (removed; returned)."""
    removed = []
    for p in final.parent.glob(f".{glob.escape(final.name)}.*-*.tmp") if final.parent.is_dir() else ():
        pid = p.name[len(final.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    The temporary lives in the same directory so the rename is atomic on POSIX. On
    any exception it is removed and ``final`` is left as it was. The file gets the
    permissions of any new file (0o666 less the umask), not mkstemp's 0600.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final), suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # after writing: a writer may have replaced the file with its own temporary
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; move it into place on success.

    The directory gets 0o777 less the umask, not mkdtemp's 0700. An empty ``final`` is
    replaced. With ``overwrite``, a full one is first renamed to a fresh unique name, and
    only that name is deleted: a fixed name such as ``.name.old`` could belong to someone else.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            try:
                os.replace(final, old)  # rename(2) may replace an empty directory
            except BaseException:
                old.rmdir()
                raise
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the old directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
