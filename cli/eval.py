"""``ppft eval``: base versus tuned on the recipe's target and preserve suites, with a regression gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DebugOpt, OutputDirOpt, RecipeArg, SetOpt, console, err_console, guarded

CheckpointOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Tuned model: a model folder or a PEFT adapter folder (default <run>/final)."),
]
GateOpt = Annotated[
    float | None,
    typer.Option(
        "--fail-on-regression",
        min=0,
        help="Exit 3 if a preserve task drops by more than this many points (overrides eval.fail_on_regression).",
    ),
]


def eval_cmd(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt = None,
    fail_on_regression: GateOpt = None,
    set_: SetOpt = [],  # noqa: B006
    output_dir: OutputDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Evaluate the base and the tuned model: new-task gain and retention; writes <run>/eval/report.{json,md}.

    Exit codes: 0 ok, 1 runtime error, 2 bad input, 3 the regression gate failed.
    """

    def run():
        from preserve_core.evaluation import run_eval
        from preserve_core.recipe import load_recipe
        from preserve_core.report import format_points, render_table

        resolved = load_recipe(recipe, set_, output_dir)
        report = run_eval(
            resolved, checkpoint, fail_on_regression, progress=lambda m: err_console.print(f"[dim]eval {m}[/]")
        )
        console.print(render_table(report))
        console.print(f"report: {resolved.run_dir() / 'eval' / 'report.md'}")
        if not report.passed:
            for task in report.regressions:
                err_console.print(
                    f"[bold red]regression:[/] {task.name} changed {format_points(task)} "
                    f"(more than the {report.fail_on_regression:g}-point gate)"
                )
            raise typer.Exit(3)

    guarded(run, debug)
