"""Task data: resolving ``lab:`` refs, reading rows, and a per-tokenizer cache of encoded examples.

Encoding follows training exactly (``preserve_core.data``): a prompt is ``[bos] + prompt``, a
prompt/completion pair ``[bos] + prompt + completion + [eos]``, a text ``[bos] + text + [eos]``.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recipe_schema import EvalTask


def resolve_task_data(task: EvalTask) -> str:
    """The local file behind ``task.data``; ``lab:<skill>`` is that skill's eval split."""
    if not task.data:
        raise RecipeError(f"eval task '{task.name}': kind {task.kind} needs a data: file or lab:<skill>")
    if not task.data.startswith("lab:"):
        return task.data
    from ..lab import resolve_data_ref

    ref, _, split = task.data.partition("@")
    return str(resolve_data_ref(ref, split or "eval"))


def load_task_rows(task: EvalTask) -> list[dict]:
    """The task's rows as dicts (first ``task.limit`` only)."""
    from ..data import load_rows

    rows = load_rows(resolve_task_data(task))
    if task.limit:
        rows = rows.select(range(min(task.limit, len(rows))))
    if len(rows) == 0:
        raise RecipeError(f"eval task '{task.name}': {task.data} has no rows")
    return rows.to_list()


def require_columns(task: EvalTask, rows: list[dict], *columns: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise RecipeError(
            f"eval task '{task.name}' ({task.kind}): rows need column(s) {missing}; {task.data} has {sorted(rows[0])}"
        )


def bos_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (as ``preserve_core.data`` encodes pieces)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """``[bos] + prompt``: the prefix training puts before a completion."""
    return bos_ids(tokenizer) + encode_plain(tokenizer, prompt)


# ---------------------------------------------------------------------------------------------
# Cache of encoded task data, so repeated calls (every N training steps) only run the model
# ---------------------------------------------------------------------------------------------
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _data_stamp(task: EvalTask) -> str:
    """Identifies the data's current content cheaply: path, size and mtime of a local file."""
    if not task.data or task.data.startswith("lab:"):
        return str(task.data)
    try:
        st = os.stat(task.data)
    except OSError:
        return task.data
    return f"{Path(task.data).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def cached_encoding(task: EvalTask, tokenizer, purpose: str, build: Callable[[], Any]) -> Any:
    """``build()`` once per (tokenizer, task definition, data file state, purpose); later calls reuse it."""
    try:
        per_tokenizer = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no caching
        return build()
    key = (purpose, json.dumps(task.model_dump(mode="json"), sort_keys=True), _data_stamp(task))
    if key not in per_tokenizer:
        per_tokenizer[key] = build()
    return per_tokenizer[key]


def clear_encoding_cache() -> None:
    _ENCODED.clear()
