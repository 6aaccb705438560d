"""An exclusive lock on a run folder, so two ``ppft train`` never write the same run.

The lock is ``flock`` on ``<run_dir>/.lock``: the kernel releases it when the holder exits for any
reason (``kill -9`` included), so a lock left by a dead process never blocks. The file holds the
holder's pid, for the error message only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import RecipeError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; a second holder fails at once (exit 2) naming the first's pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown: it is just starting"
            raise RecipeError(
                f"{run_dir} is in use by another ppft train (pid {holder}). Wait for it to finish or stop it, "
                "or write this run elsewhere with --output-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
