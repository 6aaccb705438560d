"""Checks on training data: bad rows are errors with file, row and field; doubtful data is a warning.

Errors (exit 2): an empty file, a row whose text field is missing, null or not a string, a JSONL line
that is not JSON, every completion empty. Warnings, once per data set with counts: examples cut to
``data.max_length`` or to the model's context, characters the tokenizer maps to ``<unk>``, empty
completions. The counts also go into the run's ``manifest.json`` (``truncation``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError
from .progress import notice

UNK_SAMPLE = 5  # distinct unknown characters quoted in the warning
_warned: set[str] = set()  # a data set is built by calibration and training in one process: warn once


@dataclass
class DataReport:
    """What tokenizing one data set found. ``limit``: tokens kept per example (max_length or context)."""

    total: int = 0
    truncated: int = 0
    longest: int = 0
    limit: int = 0
    context: int | None = None
    unk_examples: int = 0
    unk_tokens: int = 0
    unk_chars: list[str] = field(default_factory=list)
    empty_completions: int = 0


def check_file_not_empty(path: Path) -> None:
    """An empty (or all-blank) local data file is an error, not a ``StopIteration``."""
    size = path.stat().st_size
    if size == 0 or (size < 65536 and not path.read_bytes().strip()):
        raise RecipeError(f"data file {path} is empty: it needs at least one example (one JSON object per line for .jsonl)")


def first_bad_jsonl_line(path: Path) -> str | None:
    """``"line N: <why>"`` for the first line of a JSONL file that is not a JSON object, else None."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(value, dict):
                return f"line {number}: a JSON {type(value).__name__}, not an object with named fields"
    return None


def text_field(row: dict, column: str, index: int, source: str) -> str:
    """``row[column]``, which must be a string; else a RecipeError naming the file, row and field."""
    value = row.get(column)
    where = f"data: {source}, row {index + 1}: field '{column}'"
    if value is None:
        raise RecipeError(f"{where} is missing or null (an empty CSV cell reads as null); every row needs text there")
    if not isinstance(value, str):
        raise RecipeError(
            f"{where} is {type(value).__name__} {value!r}, not text; write it as a JSON string (\"{value}\")"
        )
    return value


def messages_field(row: dict, column: str, index: int, source: str) -> list:
    """``row[column]`` as a list of ``{role, content}`` turns with string values."""
    value = row.get(column)
    turns_ok = isinstance(value, list) and value and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value
    )
    if not turns_ok:
        raise RecipeError(
            f"data: {source}, row {index + 1}: field '{column}' must be a non-empty list of "
            f"{{role, content}} turns with text values (got {str(value)[:80]!r})"
        )
    return value


def count_unknown(report: DataReport, tokenizer, ids: list[int], text: str) -> None:
    """Add the ``<unk>`` tokens of one example to ``report``, with a few of the characters behind them."""
    unk = getattr(tokenizer, "unk_token_id", None)
    hits = ids.count(unk) if unk is not None else 0
    if not hits:
        return
    report.unk_examples += 1
    report.unk_tokens += hits
    if len(report.unk_chars) < UNK_SAMPLE:
        for char in sorted(set(text) - set(report.unk_chars)):
            if len(report.unk_chars) < UNK_SAMPLE and tokenizer(char, add_special_tokens=False)["input_ids"] == [unk]:
                report.unk_chars.append(char)


def finish(report: DataReport, source: str, truncation: str, format_: str) -> None:
    """Refuse all-empty completions; warn (once per data set) about cut, unknown and empty examples."""
    if format_ == "prompt_completion" and report.total and report.empty_completions == report.total:
        raise RecipeError(f"data: {source}: all {report.total} completions are empty; there is nothing to learn")
    messages = []
    if report.truncated:
        bound = "the model's context" if report.limit == report.context else "data.max_length"
        messages.append(
            f"{report.truncated} of {report.total} examples were longer than {report.limit} tokens ({bound}) "
            f"and were cut (data.truncation: {truncation}); the longest had {report.longest}"
        )
    if report.unk_tokens:
        chars = ", ".join(repr(c) for c in report.unk_chars)
        messages.append(
            f"{report.unk_examples} of {report.total} examples hold {report.unk_tokens} tokens the tokenizer maps to "
            f"its unknown token (characters such as {chars}); the model can neither read nor learn them"
        )
    if report.empty_completions:
        messages.append(f"{report.empty_completions} of {report.total} completions are empty (only EOS is learned)")
    for message in messages:
        text = f"data: {source}: {message}"
        if text not in _warned:
            _warned.add(text)
            notice(text)
