"""Run-time guards: finiteness checks for the training state; Ctrl-C and SIGTERM deferral around writes,
and, with several processes, stop requests that every rank honours after the same step."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point element of ``tensors`` is finite.

    Fast path: one sum per tensor and a single host sync. Under IEEE arithmetic inf and NaN absorb
    (``inf + x = inf``, ``inf - inf = NaN``, ``NaN + x = NaN``), so a finite sum proves every element
    finite. A non-finite sum can also come from finite elements overflowing, so that rare case is
    settled element by element. Integer tensors (step counters) are skipped.
    """
    floats = [t.detach() for t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not floats:
        return True
    device = floats[0].device
    if bool(torch.isfinite(torch.stack([t.sum().float().to(device) for t in floats])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floats)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (moments, step counters, ...)."""
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if torch.is_tensor(value):
                yield value


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, ``kill``, ``docker stop``): handled like Ctrl-C, exit 143."""


HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) instead of killing.

    Schedulers send SIGTERM and wait a grace period before SIGKILL; raising it as an interrupt lets
    the training loop save a checkpoint of the last completed step and exit, as on Ctrl-C. Outside
    the main thread the default handling stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_requests: list[int] | None = None  # signals recorded while coordinated_interrupts() is active
NO_STOP, STOP_INTERRUPT, STOP_TERMINATE = 0, 1, 2


@contextmanager
def deferred_interrupts(notice: str | None = None, deliver: bool = True) -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) and SIGTERM for the block; then, if ``deliver``, raise the interrupt.

    A checkpoint write or an optimizer update interrupted half-way would leave a lost checkpoint or a
    state that no longer matches its step count; with this guard the block completes and the interrupt
    takes effect right after: :class:`Terminated` if a SIGTERM came, else ``KeyboardInterrupt``
    (``deliver=False``: it is dropped, for a block that already handles one). ``notice`` is printed at
    the first held-back signal. Outside the main thread (where signal handlers cannot be installed) the
    block runs unguarded; ``kill -9`` still leaves the previous checkpoint intact because checkpoints
    are renamed into place. Inside :func:`coordinated_interrupts` (several processes) a held first
    signal becomes a stop request for the step boundary instead of an exception.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    coordinated = _requests

    def hold(signum, frame):
        if notice and not received:
            print(notice, file=sys.stderr, flush=True)
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and deliver:
        if coordinated is not None:  # several processes: a first request waits for the step boundary
            for signum in received:
                _request(coordinated, signum)
            return
        raise Terminated if signal.SIGTERM in received else KeyboardInterrupt


def _request(received: list[int], signum: int) -> None:
    """Record a first stop request; a second one (the user insisting) raises at once, on this rank only."""
    if received:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    received.append(signum)


@contextmanager
def coordinated_interrupts(notice: str | None = None) -> Iterator[None]:
    """Within the block (a run of several processes), SIGINT and SIGTERM only record a stop request.

    An interrupt raised wherever it lands would stop one rank in the middle of a step while the others
    wait in that step's collectives (a gradient all-reduce, an FSDP gather): the run hangs until the
    collective times out. Instead the training loop reads :func:`stop_requested` at each step boundary,
    sums each kind of request over ranks (SIGTERM wins over Ctrl-C) and stops every rank after the
    same step. A second signal to a process
    raises there at once (the escape hatch; that rank does not wait for the others). ``notice`` is
    printed at the first request (pass it on one rank only).
    """
    global _requests
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum, frame):
        if notice and not received:
            print(notice, file=sys.stderr, flush=True)
        _request(received, signum)

    previous = {signum: signal.signal(signum, record) for signum in HELD}
    _requests = received
    try:
        yield
    finally:
        _requests = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested() -> int:
    """This process's pending stop request: ``STOP_TERMINATE`` (SIGTERM), ``STOP_INTERRUPT`` (Ctrl-C) or
    ``NO_STOP``; always ``NO_STOP`` outside :func:`coordinated_interrupts`."""
    if not _requests:
        return NO_STOP
    return STOP_TERMINATE if signal.SIGTERM in _requests else STOP_INTERRUPT


class LossWatch:
    """Notices a run turning to garbage with finite numbers (the divergence checks catch only inf and NaN).

    A moving average of the training loss starts at the mean of the first ``window`` steps of the run and
    moves by ``(loss - ema) / window`` per step; ``best`` is its lowest value so far. :meth:`update` returns
    ``(best, ema)`` once, the first time after ``2 * window`` steps that ``ema > factor * best`` and
    ``ema - best > margin`` (nats), else None. Fine-tuning lowers the loss: doubling from the best point by
    more than a nat is a collapse (the lab's one went 4.3 -> 15), while the margin keeps a converged loss's
    noise (0.02 -> 0.05) quiet. :meth:`state` / :meth:`from_state` carry it through a checkpoint, so a
    resumed run warns where the uninterrupted one would.
    """

    def __init__(self, window: int = 10, factor: float = 2.0, margin: float = 1.0):
        self.window, self.factor, self.margin = window, factor, margin
        self.first: list[float] = []
        self.ema: float | None = None
        self.best = float("inf")
        self.steps, self.fired = 0, False

    def state(self) -> dict:
        """What :meth:`from_state` needs, as JSON values (``best`` is None until it is set)."""
        best = None if self.best == float("inf") else self.best
        return {"first": list(self.first), "ema": self.ema, "best": best, "steps": self.steps, "fired": self.fired}

    @classmethod
    def from_state(cls, state: dict | None) -> "LossWatch":
        """A watch that continues from ``state`` (a fresh one for None: checkpoints older than the field)."""
        watch = cls()
        if state:
            watch.first, watch.ema = list(state["first"]), state["ema"]
            watch.steps, watch.fired = state["steps"], state["fired"]
            watch.best = float("inf") if state["best"] is None else state["best"]
        return watch

    def update(self, loss: float) -> tuple[float, float] | None:
        self.steps += 1
        if len(self.first) < self.window:
            self.first.append(loss)
            if len(self.first) == self.window:
                self.ema = self.best = sum(self.first) / self.window
            return None
        self.ema += (loss - self.ema) / self.window
        self.best = min(self.best, self.ema)
        rising = self.ema > self.factor * self.best and self.ema - self.best > self.margin
        if self.fired or self.steps <= 2 * self.window or not rising:
            return None
        self.fired = True
        return self.best, self.ema
