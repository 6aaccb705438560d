"""``ppft compare``: evaluated runs side by side, with the learning-vs-forgetting plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from cli.common import DebugOpt, JsonOpt, emit_json, guarded, human_console


def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders, each evaluated with `ppft eval`."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Where comparison.{md,json} and the plot go."),
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare evaluated runs: new-task score vs preserved-skill score, table and Pareto plot.

    --json: one object per run on stdout (new_task, preserve_mean, preserve, mean_retention, pareto).
    """

    def run():
        from preserve_core.compare import compare_runs, render_table

        rows = compare_runs(runs, out)
        console = human_console(as_json)
        console.print(render_table(rows, console.width))
        written = f"{out / 'comparison.md'}, {out / 'learning_vs_forgetting.png'}"
        console.print(f"[green]written[/]: {escape(written)}")
        if as_json:
            emit_json({"runs": rows, "comparison_md": str(out / "comparison.md"), "plot": str(out / "learning_vs_forgetting.png")})

    guarded(run, debug)
