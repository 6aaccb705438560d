"""``ppft compare``: evaluated runs side by side, with the learning-vs-forgetting plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import DebugOpt, console, guarded


def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders, each evaluated with `ppft eval`."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Where comparison.{md,json} and the plot go."),
    debug: DebugOpt = False,
) -> None:
    """Compare evaluated runs: new-task score vs preserved-skill score, table and Pareto plot."""

    def run():
        from preserve_core.compare import compare_runs

        rows = compare_runs(runs, out)
        table = Table(title="learning vs forgetting")
        for col in ("run", "new task", "preserve mean", "mean retention", "Pareto"):
            table.add_column(col)
        for r in rows:
            retention = f"{r['mean_retention']:.3f}" if r["mean_retention"] is not None else "-"
            table.add_row(r["method"], f"{100 * r['new_task']['score']:.1f}", f"{100 * r['preserve_mean']['score']:.1f}", retention, "yes" if r["pareto"] else "")
        console.print(table)
        console.print(f"[green]written[/]: {out / 'comparison.md'}, {out / 'learning_vs_forgetting.png'}")

    guarded(run, debug)
