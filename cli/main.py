"""The ``ppft`` command line. Thin: parse, load the recipe, call ``preserve_core``, print.

Exit codes: 0 success, 1 runtime failure, 2 bad input (recipe, data, paths, overrides),
3 the retention gate failed (``ppft eval --fail-on-regression``).
"""

from __future__ import annotations

import signal
import sys

import typer
from rich.markup import escape

from cli.common import (
    DebugOpt, JsonOpt, OutputDirOpt, RecipeArg, SetOpt, ThreadsOpt, apply_threads, console, emit_json, err_console, guarded,
    is_main_process,
)  # fmt: skip

app = typer.Typer(
    name="ppft",
    help="Capability-preserving fine-tuning: calibrate, train with a protection method, evaluate retention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = [],  # noqa: B006
    output_dir: OutputDirOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Resolve a recipe (defaults filled in, paths absolute), check referenced files, print it. Loads no weights.

    stdout is the resolved recipe alone (YAML, or JSON with --json), so `ppft validate r.yaml > resolved.yaml` works.
    """

    def run():
        import yaml

        from preserve_core.recipe import load_recipe

        resolved = load_recipe(recipe, set_, output_dir).resolved()
        if as_json:
            emit_json(resolved)
        elif sys.stdout.isatty():
            from rich.syntax import Syntax

            console.print(Syntax(yaml.safe_dump(resolved, sort_keys=False), "yaml"))
        else:  # piped: the bare YAML, no colour codes, no padding
            sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
        err_console.print(f"[green]ok[/]: {escape(str(recipe))} is valid")

    guarded(run, debug)


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = [],  # noqa: B006
    output_dir: OutputDirOpt = None,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in the run directory."),
    allow_changes: bool = typer.Option(
        False, "--allow-changes", help="With --resume: accept recipe changes since the checkpoint (new optimizer settings and schedule apply from there)."
    ),
    merge: bool = typer.Option(False, "--merge", help="Adapter methods: also save merged full weights (final/merged)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune with the recipe's method. Writes <run>/final, checkpoints, metrics.jsonl and manifest.json.

    Progress and messages go to stderr; stdout ends with the final model's path (M=$(ppft train r.yaml)).
    """

    def run():
        from preserve_core.errors import RecipeError
        from preserve_core.recipe import load_recipe
        from preserve_core.training import check_runtime
        from preserve_core.training import train as train_run

        if allow_changes and not resume:
            raise RecipeError("--allow-changes only applies with --resume")
        resolved = load_recipe(recipe, set_, output_dir)
        apply_threads(resolved, threads)
        if merge:
            resolved.output.merge = True
        check_runtime(resolved)
        result = train_run(resolved, resume=resume, show_progress=progress, allow_changes=allow_changes)
        if result.interrupted:
            for signum in (signal.SIGINT, signal.SIGTERM):  # the checkpoint is saved: another must not break the exit
                signal.signal(signum, signal.SIG_IGN)
            raise typer.Exit(143 if result.terminated else 130)
        if is_main_process():
            err_console.print(f"[green]done[/]: {result.steps} steps, final loss {result.final_loss:.4f}; model in:")
            print(result.final_dir, flush=True)  # the last line of stdout: M=$(ppft train r.yaml) works

    guarded(run, debug)


# Subcommands that live in their own modules (one per concern).
from cli.bench import bench  # noqa: E402
from cli.calibrate import calibrate  # noqa: E402
from cli.compare import compare  # noqa: E402
from cli.eval import eval_cmd  # noqa: E402
from cli.lab import lab_app  # noqa: E402

app.command("bench")(bench)
app.command("calibrate")(calibrate)
app.command("eval")(eval_cmd)
app.command("compare")(compare)
app.add_typer(lab_app, name="lab")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

