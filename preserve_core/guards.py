"""Run-time guards: finiteness checks for the training state, and Ctrl-C deferral around writes."""

from __future__ import annotations

import math
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.nn.utils import get_total_norm


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point element of ``tensors`` is finite.

    One fused reduction: the max-abs norm ``max_i |t_i|`` over all tensors is finite exactly when no
    element is inf or NaN (NaN propagates through the max), and it cannot overflow the way a sum can.
    Integer tensors (step counters) are skipped.
    """
    floats = [t.detach() for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not floats:
        return True
    return bool(torch.isfinite(get_total_norm(floats, norm_type=math.inf)))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (moments, step counters, ...)."""
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if torch.is_tensor(value):
                yield value


@contextmanager
def deferred_sigint(notice: str | None = None, deliver: bool = True) -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the duration of the block; then, if ``deliver``, raise ``KeyboardInterrupt``.

    A checkpoint write or an optimizer update interrupted half-way would leave a lost checkpoint or a
    state that no longer matches its step count; with this guard the block completes and the interrupt
    takes effect right after (``deliver=False``: it is dropped, for a block that already handles one).
    ``notice`` is printed at the first held-back Ctrl-C. Outside the main thread (where signal handlers
    cannot be installed) the block runs unguarded; ``kill -9`` still leaves the previous checkpoint
    intact because checkpoints are renamed into place.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, frame):
        if notice and not received:
            print(notice, file=sys.stderr, flush=True)
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and deliver:
        raise KeyboardInterrupt
