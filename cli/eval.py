"""``ppft eval``: base versus tuned on the recipe's target and preserve suites, with a regression gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.common import (
    DebugOpt, JsonOpt, OutputDirOpt, RecipeArg, SetOpt, ThreadsOpt, apply_threads, emit_json, err_console, guarded, human_console,
)  # fmt: skip

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
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Evaluate the base and the tuned model: new-task gain and retention; writes <run>/eval/report.{json,md}.

    --json: the report on stdout (top-level retention, new_task_gain, passed; per-task rows), table to stderr.
    Exit codes: 0 ok, 1 runtime error, 2 bad input, 3 the regression gate failed.
    """

    def run():
        from preserve_core.evaluation import run_eval
        from preserve_core.recipe import load_recipe
        from preserve_core.report import format_points, render_table

        resolved = load_recipe(recipe, set_, output_dir)
        apply_threads(resolved, threads)
        report = run_eval(
            resolved, checkpoint, fail_on_regression, progress=lambda m: err_console.print(f"[dim]eval {escape(m)}[/]")
        )
        out = human_console(as_json)
        out.print(render_table(report, out.width))
        out.print(f"report: {resolved.run_dir() / 'eval' / 'report.md'}", markup=False)
        if as_json:
            emit_json(json_summary(report, resolved.run_dir() / "eval"))
        if not report.passed:
            for task in report.regressions:
                err_console.print(
                    f"[bold red]regression:[/] {task.name} changed {format_points(task)} "
                    f"(more than the {report.fail_on_regression:g}-point gate)"
                )
            raise typer.Exit(3)

    guarded(run, debug)


def json_summary(report, folder: Path) -> dict:
    """``report.json`` without the per-example samples, with the headline numbers at the top level."""
    data = report.to_dict()
    data.pop("samples", None)
    summary = data.pop("summary")
    return {
        "retention": summary["mean_retention"], "new_task_gain": summary["new_task_gain_points"],
        "passed": summary["passed"], "regressions": summary["regressions"],
        "report_json": str(folder / "report.json"), "report_md": str(folder / "report.md"), **data,
    }  # fmt: skip
