"""The base-result cache (``preserve_core.evaluation.cache``): where it lives, what its key is made of, what it keeps.

Hashes are recomputed here from the definitions in the module docstring with ``hashlib``; the
cache files are read back as JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from preserve_core.evaluation.cache import (
    CACHE_VERSION,
    BaseCache,
    cache_dir,
    folder_hash,
    task_data_hash,
    tokenizer_fingerprint,
)
from preserve_core.recipe_schema import EvalTask
from preserve_core.report import TaskResult


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tok:
    """The parts of a tokenizer the fingerprint reads."""

    def __init__(self, vocab=None, bos=1, eos=2, pad=0, chat_template=None):
        self.vocab = vocab or {"a": 3, "<s>": 1, "b": 4}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        self.chat_template = chat_template

    def get_vocab(self):
        return dict(self.vocab)


class OtherTok(Tok):
    pass


def test_cache_dir_prefers_ppft_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PPFT_HOME", "~/ppft")
    assert cache_dir(tmp_path / "run") == tmp_path / "home" / "ppft" / "eval_cache"
    monkeypatch.setenv("PPFT_HOME", "")
    assert cache_dir(tmp_path / "run") == tmp_path / "run" / "eval" / "cache"
    monkeypatch.delenv("PPFT_HOME")
    assert cache_dir(str(tmp_path / "run")) == tmp_path / "run" / "eval" / "cache"


def test_tokenizer_fingerprint_by_definition():
    """sha256(class name, sorted vocabulary as JSON, [bos, eos, pad] as JSON, str(chat template))[:16]."""
    expected = sha(b"Tok" + b'[["<s>", 1], ["a", 3], ["b", 4]]' + b"[1, 2, 0]" + b"None")[:16]
    assert tokenizer_fingerprint(Tok()) == expected
    assert tokenizer_fingerprint(SimpleNamespace(get_vocab=dict, bos_token_id=None, eos_token_id=None,
                                                 pad_token_id=None)) == sha(b"SimpleNamespace[][null, null, null]None")[:16]  # fmt: skip
    variants = [Tok(vocab={"a": 3, "<s>": 1, "c": 4}), Tok(bos=5), Tok(eos=5), Tok(pad=5), Tok(chat_template="{{x}}"),
                OtherTok()]  # fmt: skip
    assert len({tokenizer_fingerprint(t) for t in [Tok(), *variants]}) == 7  # each part changes it


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "b.yaml").write_text("task: b\n")
    (root / "sub" / "a.yaml").write_text("task: a\n")
    (root / "sub" / "__pycache__").mkdir()
    (root / "sub" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    return root


def test_folder_hash_by_definition(tmp_path):
    """sha256 over the sorted relative paths of the files (``__pycache__`` skipped), each followed by its sha256."""
    root = make_folder(tmp_path / "tasks")
    expected = sha(b"b.yaml" + sha(b"task: b\n").encode() + b"sub/a.yaml" + sha(b"task: a\n").encode())
    assert folder_hash(root) == expected
    (root / "sub" / "__pycache__" / "y.pyc").write_bytes(b"1")
    (root / "empty").mkdir()
    assert folder_hash(root) == expected  # caches and empty folders do not count
    (root / "sub" / "a.yaml").write_text("task: A\n")
    assert folder_hash(root) != expected
    (root / "sub" / "a.yaml").write_text("task: a\n")
    (root / "sub" / "a.yaml").rename(root / "sub" / "c.yaml")
    assert folder_hash(root) != expected  # a renamed file changes it too


def test_task_data_hash_per_kind(tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n')
    assert task_data_hash(EvalTask(name="p", kind="perplexity", data=str(data))) == sha(b'{"text": "a"}\n')
    assert task_data_hash(EvalTask(name="p", kind="perplexity", data="org/dataset")) == "ref:org/dataset"
    root = make_folder(tmp_path / "tasks")
    lm = EvalTask(name="l", kind="lm_eval", lm_eval_tasks=["b"], lm_eval_include_path=str(root))
    assert task_data_hash(lm) == folder_hash(root)
    assert task_data_hash(EvalTask(name="l", kind="lm_eval", lm_eval_tasks=["arc"])) == "builtin"
    import preserve_core.lab

    monkeypatch.setattr(preserve_core.lab, "resolve_data_ref", lambda ref, split, size="tiny": str(data), raising=False)
    assert task_data_hash(EvalTask(name="s", kind="exact_match", data="lab:shift")) == sha(b'{"text": "a"}\n')


@pytest.fixture
def task(tmp_path) -> EvalTask:
    data = tmp_path / "em.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return EvalTask(name="em", kind="exact_match", data=str(data), max_new_tokens=4)


def test_cache_key_by_definition(tmp_path, task):
    cache = BaseCache(tmp_path / "c", "model-fp", Tok(), "bfloat16")
    identity = {"version": CACHE_VERSION, "model": "model-fp", "tokenizer": tokenizer_fingerprint(Tok()), "dtype": "bfloat16"}
    assert CACHE_VERSION == 1 and cache.identity == identity and cache.directory == tmp_path / "c"
    definition = {k: v for k, v in json.loads(task.model_dump_json()).items() if k != "name"}
    blob = json.dumps({**identity, "task": definition, "data": sha(Path(task.data).read_bytes())}, sort_keys=True)
    assert cache.key(task) == sha(blob.encode())[:32]
    assert cache.path(task) == tmp_path / "c" / f"{sha(blob.encode())[:32]}.json"
    assert cache.key(task.model_copy(update={"name": "renamed"})) == cache.key(task)  # the name is not part of it
    others = [
        BaseCache(tmp_path / "c", "other-fp", Tok(), "bfloat16").key(task),
        BaseCache(tmp_path / "c", "model-fp", Tok(bos=9), "bfloat16").key(task),
        BaseCache(tmp_path / "c", "model-fp", Tok(), "float32").key(task),
        cache.key(task.model_copy(update={"max_new_tokens": 5})),
    ]
    assert len({cache.key(task), *others}) == 5
    Path(task.data).write_text('{"prompt": "a", "completion": "c"}\n')
    assert cache.key(task) not in {*others, sha(blob.encode())[:32]}  # new data, new key


def test_cache_put_then_get(tmp_path, task):
    cache = BaseCache(tmp_path / "deep" / "cache", "fp", Tok(), "float32")
    assert cache.get(task) is None  # nothing stored yet
    stored = TaskResult("em", "exact_match", "exact_match", 0.5, 4, 0.25, samples=[{"prompt": Path("p")}])
    cache.put(task, stored)
    cache.put(task, stored)  # the folder exists now: fine
    on_disk = json.loads(cache.path(task).read_text())
    assert on_disk["identity"] == cache.identity and on_disk["result"]["samples"] == [{"prompt": "p"}]
    assert on_disk["result"]["score"] == 0.5 and list(tmp_path.joinpath("deep", "cache").iterdir()) == [cache.path(task)]
    got = cache.get(task.model_copy(update={"name": "renamed"}))
    assert got == TaskResult("renamed", "exact_match", "exact_match", 0.5, 4, 0.25, samples=[{"prompt": "p"}])


@pytest.mark.parametrize("content", ["not json", '{"identity": {}}', '{"result": {"bogus": 1}}', '{"result": null}', "[]"])
def test_cache_get_recomputes_unreadable_entries(tmp_path, task, content):
    cache = BaseCache(tmp_path, "fp", Tok(), "float32")
    cache.path(task).write_text(content)
    assert cache.get(task) is None
