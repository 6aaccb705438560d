"""``ppft bench``: every method x learning rate x task x seed on one base recipe; table and Pareto plot."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import (
    DebugOpt, JsonOpt, RecipeArg, SetOpt, ThreadsOpt, apply_threads, emit_json, err_console, guarded, human_console,
)  # fmt: skip


def bench(
    recipe: RecipeArg,
    set_: SetOpt = [],  # noqa: B006
    only: list[str] = typer.Option([], "--only", help="Run only these method labels (repeatable); results merge into the full table."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Cells run in parallel, each in its own worker process."),
    threads: ThreadsOpt = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and exit."),
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare methods on the recipe's bench: section. Resumable: finished cells are not re-run.

    Progress goes to stderr. --json: the aggregated rows (and the best lr per method) on stdout.
    --threads is the total for the bench: with --jobs N each worker gets threads // N (default: cores // N).
    """

    def run():
        from preserve_core.bench import BenchRunner, plan_cells, select_cells, validate_plan
        from preserve_core.bench_parallel import run_cells
        from preserve_core.bench_report import best_per_method
        from preserve_core.bench_table import render_summary
        from preserve_core.recipe import load_recipe
        from preserve_core.threads import threads_per_worker

        resolved = load_recipe(recipe, set_)
        plan = plan_cells(resolved)
        cells = select_cells(plan, only)
        runner = BenchRunner(resolved)
        validate_plan(resolved, cells, runner.cells_dir)
        console = human_console(as_json)
        if dry_run:
            for cell in cells:
                console.print(cell.id, markup=False)
            console.print(f"{len(cells)} cells")
            if as_json:
                emit_json({"cells": [cell.id for cell in cells]})
            return
        total = threads or resolved.training.threads
        apply_threads(resolved, total if jobs == 1 else threads_per_worker(jobs, total))
        todo = [c for c in cells if not runner.finished(c)]
        with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err_console) as progress:  # fmt: skip
            bar = progress.add_task("base model", total=len(cells), completed=len(cells) - len(todo))
            runner.base_scores()
            progress.update(bar, description=f"{len(todo)} cells to run, {jobs} at a time")
            advance = lambda cell, _: progress.update(bar, advance=1, description=escape(cell.id))  # noqa: E731
            run_cells(runner, todo, jobs, resolved.training.threads, advance)
        rows, rebuilt = runner.write_results(plan, {c.id for c in todo})
        console.print(render_summary(rows, console.width))
        console.print(f"[green]done[/]: {escape(str(rebuilt))}")
        if as_json:
            emit_json({"out": str(runner.out), "best": best_per_method(rows), "rows": rows})

    guarded(run, debug)
