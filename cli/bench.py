"""``ppft bench``: every method x learning rate x task x seed on one base recipe; table and Pareto plot."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import DebugOpt, JsonOpt, RecipeArg, SetOpt, emit_json, err_console, guarded, human_console


def bench(
    recipe: RecipeArg,
    set_: SetOpt = [],  # noqa: B006
    only: list[str] = typer.Option([], "--only", help="Run only these method labels (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and exit."),
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare methods on the recipe's bench: section. Resumable: finished cells are not re-run.

    Progress goes to stderr. --json: the aggregated rows (and the best lr per method) on stdout.
    """

    def run():
        from preserve_core.bench import BenchRunner, plan_cells, validate_plan
        from preserve_core.bench_report import best_per_method, write_results
        from preserve_core.bench_table import render_summary
        from preserve_core.recipe import load_recipe

        resolved = load_recipe(recipe, set_)
        cells = [c for c in plan_cells(resolved) if not only or c.label in only]
        runner = BenchRunner(resolved)
        validate_plan(resolved, cells, runner.cells_dir)
        console = human_console(as_json)
        if dry_run:
            for cell in cells:
                console.print(cell.id)
            console.print(f"{len(cells)} cells")
            if as_json:
                emit_json({"cells": [cell.id for cell in cells]})
            return
        with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err_console) as progress:  # fmt: skip
            bar = progress.add_task("base model", total=len(cells))
            base = runner.base_scores()
            records = []
            for cell in cells:
                progress.update(bar, description=cell.id)
                records.append(runner.run_cell(cell))
                progress.advance(bar)
        preserve = [t.name for t in resolved.eval.preserve]
        settings = {"steps": resolved.training.max_steps, "batch_size": resolved.training.batch_size,
                    "seeds": resolved.bench.seeds, "model": resolved.model.name_or_path,
                    "held_out": [t.name for t in resolved.bench.tasks if t.held_out]}  # fmt: skip
        rows = write_results(runner.out, records, base, preserve, settings)
        console.print(render_summary(rows, console.width))
        console.print(f"[green]done[/]: {len(records)} cells; {runner.out}/results.md, results.json, pareto.png")
        if as_json:
            emit_json({"out": str(runner.out), "best": best_per_method(rows), "rows": rows})

    guarded(run, debug)
