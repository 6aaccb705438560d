"""Exclusive file locks between processes (parallel bench cells, ranks of one launch, parallel runs)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(target: Path):
    """Hold an exclusive ``flock`` on ``<target's folder>/.<target name>.lock`` for the block.

    Every process that writes ``target`` takes this lock first, so one writes while the others wait,
    then find the finished result.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.with_name(f".{target.name}.lock")
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from .progress import notice

            notice(f"waiting for another process writing {target} (it holds {path}); this run continues when it is done")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
