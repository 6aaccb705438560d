"""What the bench scripts share: the random-init model and data they run on, their common options,
interleaved rounds of the variants they compare, writing the result file, and Markdown tables.

The scripts run as ``python bench/<script>.py``, so this folder is on ``sys.path`` and they import
this module as ``common``, which puts this checkout's ``preserve_core`` and ``tests`` (for the tiny
model builders of ``tests/conftest.py``) first on ``sys.path``. It imports nothing heavy itself, so
``summarize.py`` runs without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

T = TypeVar("T")


def save_model(root: Path, hidden: int, layers: int, max_positions: int = 128) -> Path:
    """A random-init (seed 0) Llama of width ``hidden`` and depth ``layers``, with the character
    tokenizer, saved to ``root/model``; returns that folder."""
    from conftest import build_char_tokenizer, build_tiny_llama

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden=hidden, layers=layers, max_positions=max_positions)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def make_fixture(root: Path, hidden: int, layers: int, n_rows: int) -> tuple[Path, Path]:
    """``(model folder, task.jsonl)``: :func:`save_model` and ``n_rows`` string-reversal rows."""
    from conftest import reverse_examples, write_jsonl

    return save_model(root, hidden, layers), write_jsonl(root / "task.jsonl", reverse_examples(n_rows))


def write_recipe(path: Path, recipe: dict) -> Path:
    """``recipe`` (the sections as dicts) written as YAML to ``path``."""
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def bench_parser(
    doc: str, out: Path, steps: int, batch: int = 16, hidden: int = 256, layers: int = 4
) -> argparse.ArgumentParser:
    """The options every training bench has (result file, steps, batch, model width and depth), with
    this script's defaults; the script adds its own after them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    return parser


def interleaved(
    variants: dict[str, Callable[[], T]], rounds: int, report: Callable[[str, T], None] | None = None
) -> dict[str, list[T]]:
    """Each variant once per round, in order, for ``rounds`` rounds: ``{name: [result of round 0, ...]}``.

    Variants measured next to each other share the machine's load, so a load that drifts hits them
    alike: compare them within a round, or by their best over rounds. ``report(name, result)`` is
    called after each run.
    """
    runs: dict[str, list[T]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            runs[name].append(run())
            if report is not None:
                report(name, runs[name][-1])
    return runs


def write_result(out: Path, result: dict, shown: dict | None = None) -> None:
    """``result`` as indented JSON to ``out`` (folders made as needed); prints ``shown`` (default: all of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result if shown is None else shown, indent=2, default=str))


def markdown_table(headers: list[str], rows: list[list[str]], intro: str | None = None) -> list[str]:
    """The lines of a Markdown table (an empty cell renders ``| |``), after ``intro`` and a blank line if given."""

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    head = [intro, ""] if intro is not None else []
    return [*head, line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]
