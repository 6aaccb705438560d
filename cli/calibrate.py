"""``ppft calibrate``: preserve data, activation statistics and method extras for a recipe.

Registered in ``cli/main.py`` as ``app.command("calibrate")(calibrate)``.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from preserve_core.tables import PlainTable

from cli.common import DebugOpt, OutputDirOpt, RecipeArg, SetOpt, ThreadsOpt, apply_threads, console, guarded


def calibrate(
    recipe: RecipeArg,
    set_: SetOpt = [],  # noqa: B006
    output_dir: OutputDirOpt = None,
    force: bool = typer.Option(False, "--force", help="Recompute even when matching calibration output exists."),
    summary: bool = typer.Option(
        False, "--summary", help="Also compute C_p and C_t (if the method reads neither) and print their effective ranks "
        "(one eigendecomposition per layer input: slow at real widths)."
    ),
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Sample (or read) preserve data, collect the statistics the method reads (C_p and/or C_t per distinct
    target-layer input), save to the calibration folder."""

    def run():
        from preserve_core.calibration import ensure_calibration, stats_needed, summary_rows
        from preserve_core.methods import METHODS
        from preserve_core.models import load_model, load_tokenizer
        from preserve_core.recipe import load_recipe
        from preserve_core.training import make_accelerator

        resolved = load_recipe(recipe, set_, output_dir)
        apply_threads(resolved, threads)
        accelerator = make_accelerator(resolved)
        tokenizer = load_tokenizer(resolved.model)
        model = load_model(resolved.model, accelerator.device)
        method_cls = METHODS[resolved.method.name]
        stats = ["preserve", "task"] if summary else stats_needed(method_cls, resolved.method)
        cal = ensure_calibration(resolved, model, tokenizer, method_cls, accelerator, force=force, stats=stats)
        if accelerator.is_main_process:
            if summary:
                console.print(summary_table(summary_rows(cal, device=accelerator.device)))
            state = "up to date, reused (--force recomputes)" if cal.reused else "written"
            counts = cal.token_counts()
            held = ", ".join(f"{counts[w]} {w} tokens" for w in cal.stats()) or "no statistics: the method reads none"
            console.print(f"[green]{state}[/]: {escape(str(cal.dir))} ({len(cal.preserve_texts)} preserve texts; {held})")

    guarded(run, debug)


def common_prefix(keys: list[str]) -> str:
    """The longest dotted prefix all keys share (``model.layers.``), shown once in the caption."""
    parts = [k.split(".") for k in keys]
    n = 0
    while parts and all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return ".".join(parts[0][:n]) + "." if n else ""


def summary_table(rows: list[dict]) -> Table:
    """Per input key: width n, tokens, and the effective ranks (0.90 / 0.95 / 0.99 energy) of C_p, C_t."""
    prefix = common_prefix([r["key"] for r in rows])
    table = PlainTable(
        title="calibration: effective rank of C_p and C_t at 0.90 / 0.95 / 0.99 energy",
        caption=f"layer inputs under {prefix}" if prefix else None,
    )
    table.add_column("layer input", overflow="fold")
    for column in ("n", "tokens p", "rank C_p", "tokens t", "rank C_t"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["key"][len(prefix) :], str(r["dim"]), str(r["tokens_p"] or "-"), _ranks(r["ranks_p"]),
            str(r["tokens_t"] or "-"), _ranks(r["ranks_t"]),
        )
    return table


def _ranks(ranks: list[int] | None) -> str:
    return "/".join(map(str, ranks)) if ranks is not None else "-"
