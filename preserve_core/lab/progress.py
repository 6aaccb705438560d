"""``build_lab`` with a rich progress bar (pretraining steps, loss) for the CLI and first-use builds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .build import build_lab


def build_with_progress(size: str, seed: int, force: bool, show: bool = True) -> Path:
    """Build (or reuse) the lab; a live bar on stderr when ``show``."""
    columns = [
        TextColumn("pretraining lab:{task.fields[size]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), disable=not show, transient=False) as bar:
        task = bar.add_task("build", total=None, size=size, loss=float("nan"))

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        return build_lab(size, seed, force=force, on_step=on_step)
