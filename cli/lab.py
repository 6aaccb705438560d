"""``ppft lab``: build and inspect the skills lab (the embedded default model and its data)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from cli.common import DebugOpt, JsonOpt, console, emit_json, guarded, human_console

lab_app = typer.Typer(help="The skills lab: a tiny pretrained model with exactly measurable skills.", no_args_is_help=True)

SizeOpt = typer.Option("tiny", "--size", help="Lab preset: tiny (CPU, minutes), wide (CPU, hidden 256), small (GPU), micro (tests).")
SeedOpt = typer.Option(0, "--seed", help="Seed of the model initialisation and pretraining stream.")


@lab_app.command("build")
def build(
    size: str = SizeOpt,
    seed: int = SeedOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching build is cached."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the pretraining progress bar."),
    debug: DebugOpt = False,
) -> None:
    """Pretrain the lab model (or reuse the cached build) and print its card."""

    def run():
        from preserve_core.lab import is_built, read_card
        from preserve_core.lab.progress import build_with_progress

        reused = is_built(size, seed) and not force
        path = build_with_progress(size, seed, force, show=progress)
        print_card(read_card(size, seed), path, reused)

    guarded(run, debug)


@lab_app.command("info")
def info(size: str = SizeOpt, seed: int = SeedOpt, as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Print the card of a built lab (where it is, per-skill accuracy), or how to build it.

    --json: the card (plus "path" and "model") on stdout.
    """

    def run():
        from preserve_core.errors import RecipeError
        from preserve_core.lab import build_path, data_dir, preset, read_card

        card = read_card(size, seed)
        if card is None:
            raise RecipeError(f"lab '{size}' (seed {seed}) is not built yet: run `ppft lab build --size {size} --seed {seed}`.")
        path = build_path(size, seed)
        print_card(card, path, True, human_console(as_json))
        if as_json:
            emit_json({"path": str(path), "model": str(path / "model"), **card, "data": str(data_dir(preset(size)))})

    guarded(run, debug)


def print_card(card: dict, path, reused: bool, out: Console = console) -> None:
    """The card as a table (skill, role, tag, exact match) and where the model and data are."""
    from preserve_core.tables import make_table

    title = f"lab:{card['size']} (seed {card['seed']}, {card['parameters']:,} parameters)"
    table = make_table(title, ["skill", "role", "tag", "exact match"], out.width, left=3)
    for name, skill in card["skills"].items():
        role = "pretraining" if name in card["pretrain_skills"] else "new task"
        table.add_row(name, role, skill["tag"] + ":", f"{card['accuracy'][name]:.3f}")
    out.print(table)
    from preserve_core.lab import data_dir, preset

    state = "reused cached build" if reused else f"built in {card['pretrain_seconds']} s"
    data = data_dir(preset(card["size"]))  # under the current $PPFT_HOME, wherever the lab was built
    out.print(f"[green]{state}[/]\nmodel: {escape(str(path / 'model'))}\ndata:  {escape(str(data))}", soft_wrap=True)
