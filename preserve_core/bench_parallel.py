"""Running bench cells: in this process (``--jobs 1``) or in ``jobs`` worker processes.

Cells are independent (each trains from the base with its own seed), so they run in any order and
in parallel. Each worker is a fresh ``spawn`` process with ``threads`` torch threads, loads the base
model once and runs cells until none are left; a cell's result is its ``cell.json``, written
atomically when it is finished, so an interrupted bench (Ctrl-C stops the workers) resumes with the
cells that have none. Calibration shared by cells of one task and seed is computed by the first
worker that needs it while the others wait on its lock (``calibration.ensure_calibration``).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable

from .bench import BenchRunner, Cell
from .recipe import Recipe
from .threads import set_threads

_runner: BenchRunner | None = None  # one per worker process


def _start_worker(recipe: Recipe, threads: int) -> None:
    global _runner
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    set_threads(threads)
    _runner = BenchRunner(recipe)


def _run_in_worker(cell: Cell) -> tuple[str, dict]:
    return cell.id, _runner.run_cell(cell)


def run_cells(runner: BenchRunner, cells: list[Cell], jobs: int, threads: int | None, on_done: Callable[[Cell, dict], None]) -> None:
    """Run ``cells`` (one process, or ``jobs`` workers with ``threads`` each); ``on_done(cell, record)`` as each finishes."""
    if jobs <= 1 or len(cells) <= 1:
        set_threads(threads)
        for cell in cells:
            on_done(cell, runner.run_cell(cell))
        return
    recipe = runner.recipe.model_copy(deep=True)
    recipe.training.threads = threads  # each cell's recipe (and manifest) records what it ran with
    by_id = {c.id: c for c in cells}
    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(cells)), _start_worker, (recipe, threads))
    try:
        for cell_id, record in pool.imap_unordered(_run_in_worker, cells):
            on_done(by_id[cell_id], record)
        pool.close()
    except BaseException:
        pool.terminate()  # unfinished cells have no cell.json: the next run restarts them
        raise
    finally:
        pool.join()
