"""A disk cache of the base model's results, so evaluating a new checkpoint does not re-run the base.

Key = sha256 of: cache format version, base model fingerprint (``models.model_fingerprint``),
tokenizer fingerprint, load dtype, the task definition (minus its name) and a hash of the
task's data (the file's sha256; every file of an lm-eval include folder). One JSON file per key
in ``$PPFT_HOME/eval_cache`` when ``PPFT_HOME`` is set (shared by runs), else ``<run_dir>/eval/cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..models import file_sha256
from ..recipe_schema import EvalTask
from ..report import TaskResult
from ..runs import write_atomic
from .rows import resolve_task_data

CACHE_VERSION = 1


def cache_dir(run_dir: Path) -> Path:
    home = os.environ.get("PPFT_HOME")
    return Path(home).expanduser() / "eval_cache" if home else Path(run_dir) / "eval" / "cache"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def task_data_hash(task: EvalTask) -> str:
    if task.kind == "lm_eval":
        return folder_hash(Path(task.lm_eval_include_path)) if task.lm_eval_include_path else "builtin"
    path = Path(resolve_task_data(task))
    return file_sha256(path) if path.is_file() else f"ref:{task.data}"


class BaseCache:
    """``get(task)`` / ``put(task, result)`` for one base model, tokenizer and dtype."""

    def __init__(self, directory: Path, model_fingerprint: str, tokenizer, dtype: str):
        self.directory = Path(directory)
        self.identity = {
            "version": CACHE_VERSION,
            "model": model_fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "dtype": dtype,
        }

    def key(self, task: EvalTask) -> str:
        definition = task.model_dump(mode="json", exclude={"name"})
        blob = json.dumps({**self.identity, "task": definition, "data": task_data_hash(task)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, task: EvalTask) -> Path:
        return self.directory / f"{self.key(task)}.json"

    def get(self, task: EvalTask) -> TaskResult | None:
        path = self.path(task)
        try:
            result = TaskResult.from_dict(json.loads(path.read_text())["result"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: recompute
            return None
        result.name = task.name
        return result

    def put(self, task: EvalTask, result: TaskResult) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(task), json.dumps({"identity": self.identity, "result": result.to_dict()}, default=str))
