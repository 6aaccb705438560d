"""CPU thread counts: one deliberate setting per process instead of whatever torch guesses.

torch's default is one intra-op thread per core (or ``OMP_NUM_THREADS``). That is right for one run
on an idle machine and wrong for several processes sharing the cores: each spins a thread per core
and they preempt one another (on 2 shared cores, 4 bench cells took 106 s with the default 2 threads,
90 s with one, 70 s two at a time: bench/results/parallel.json). ``training.threads`` / ``--threads`` set the count for a process; ``ppft bench --jobs N``
gives each worker ``cores // N``.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(count: int | None) -> int:
    """Use ``count`` intra-op and inter-op threads in this process; ``None`` keeps torch's default.

    Call it early: torch fixes the inter-op pool at its first parallel work, after which only the
    intra-op count (the one that matters for CPU matmuls) can change. Returns the intra-op count in use.
    """
    if count is not None:
        torch.set_num_threads(count)
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError:  # the inter-op pool has started already: it stays as it is
            pass
    return torch.get_num_threads()


def threads_per_worker(jobs: int, total: int | None = None) -> int:
    """Threads for each of ``jobs`` parallel workers sharing ``total`` threads (default: the available cores)."""
    return max(1, (total or available_cores()) // jobs)
