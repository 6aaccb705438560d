"""What every subcommand shares: consoles, common options, and error handling with exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str],
    typer.Option("--set", help="Override a recipe value: key.path=value (YAML value). Repeatable.", show_default=False),
]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", help="Run directory (overrides output.dir).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Machine-readable JSON on stdout; the human output goes to stderr.")
]


def human_console(as_json: bool) -> Console:
    """Where tables and messages go: stderr when stdout carries JSON, stdout otherwise."""
    return err_console if as_json else console


def emit_json(data: object) -> None:
    """``data`` as indented JSON on stdout, one document, newline-terminated (NaN becomes null)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _finite(value: object) -> object:
    """NaN and infinities are not JSON: null instead, recursively."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads for torch (overrides training.threads; default: torch's)."),
]


def apply_threads(recipe, threads: int | None) -> None:
    """``--threads`` over ``training.threads``, applied to torch before any model is loaded."""
    from preserve_core.threads import set_threads

    if threads is not None:
        recipe.training.threads = threads
    set_threads(recipe.training.threads)


def guarded(fn: Callable[[], object], debug: bool) -> object:
    """Run ``fn``; turn ppft errors into one clear paragraph and the right exit code (no traceback unless --debug)."""
    from preserve_core.errors import PPFTError, hint_for

    try:
        return fn()
    except typer.Exit:
        raise
    except PPFTError as e:
        if debug:
            raise
        kind = "invalid input" if e.exit_code == 2 else "error"
        err_console.print(f"[bold red]{kind}:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as interrupt:
        from preserve_core.guards import Terminated

        terminated = isinstance(interrupt, Terminated)
        err_console.print("[yellow]terminated[/]" if terminated else "[yellow]interrupted[/]")
        raise typer.Exit(143 if terminated else 130) from None
    except Exception as e:  # anything else is a bug or an environment problem: say so plainly
        if debug:
            raise
        hint = hint_for(e)
        err_console.print(
            f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}"
            + (f"\n[bold]hint:[/] {escape(hint)}" if hint else "")
            + "\n(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def is_tty() -> bool:
    return sys.stderr.isatty()


def is_main_process() -> bool:
    """True on rank 0 of a torchrun / accelerate launch, and in a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0
