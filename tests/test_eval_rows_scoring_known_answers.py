"""Task rows, padding, batching, logits and suites (``evaluation.rows``, ``.scoring``, ``.suite``) by hand."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preserve_core.data import pad_id_of
from preserve_core.errors import RecipeError
from preserve_core.evaluation import rows, suite
from preserve_core.evaluation.rows import (
    _data_stamp,
    bos_ids,
    cached_encoding,
    clear_encoding_cache,
    encode_plain,
    encode_prompt,
    load_task_rows,
    require_columns,
    resolve_task_data,
)
from preserve_core.evaluation.scoring import (
    base_logits,
    eval_mode,
    length_batches,
    model_logits,
    right_pad,
)
from preserve_core.evaluation.suite import check_unique_names, evaluate_suite, retention_metrics
from preserve_core.recipe_schema import EvalTask
from preserve_core.report import TaskResult
from tests.conftest import build_char_tokenizer

TOK = build_char_tokenizer()


def write_rows(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def test_resolve_task_data(monkeypatch):
    import preserve_core.lab

    asked = []
    monkeypatch.setattr(preserve_core.lab, "resolve_data_ref", lambda ref, split, size="tiny": asked.append((ref, split))
                        or Path(f"/lab/{split}.jsonl"), raising=False)  # fmt: skip
    assert resolve_task_data(EvalTask(name="a", kind="perplexity", data="x/rows.jsonl")) == "x/rows.jsonl"
    assert resolve_task_data(EvalTask(name="a", kind="perplexity", data="lab:shift")) == "/lab/eval.jsonl"
    assert resolve_task_data(EvalTask(name="a", kind="perplexity", data="lab:shift@train")) == "/lab/train.jsonl"
    assert resolve_task_data(EvalTask(name="a", kind="perplexity", data="lab:s@a@b")) == "/lab/a@b.jsonl"
    assert asked == [("lab:shift", "eval"), ("lab:shift", "train"), ("lab:s", "a@b")]
    with pytest.raises(RecipeError) as err:
        resolve_task_data(EvalTask(name="a", kind="perplexity"))
    assert str(err.value) == "eval task 'a': kind perplexity needs a data: file or lab:<skill>"


def test_load_task_rows_limit_and_empty(tmp_path, monkeypatch):
    data = write_rows(tmp_path / "r.jsonl", [{"text": t} for t in "abc"])
    assert load_task_rows(EvalTask(name="a", kind="perplexity", data=data)) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert load_task_rows(EvalTask(name="a", kind="perplexity", data=data, limit=2)) == [{"text": "a"}, {"text": "b"}]
    assert len(load_task_rows(EvalTask(name="a", kind="perplexity", data=data, limit=5))) == 3
    import datasets

    import preserve_core.data

    monkeypatch.setattr(preserve_core.data, "load_rows", lambda source: datasets.Dataset.from_dict({"text": []}))
    with pytest.raises(RecipeError) as err:  # (a data set with no rows: files with none are refused earlier)
        load_task_rows(EvalTask(name="e", kind="perplexity", data="org/empty"))
    assert str(err.value) == "eval task 'e': org/empty has no rows"


def test_require_columns_names_what_is_missing():
    task = EvalTask(name="mc", kind="multiple_choice", data="d.jsonl")
    require_columns(task, [{"prompt": 1, "choices": 2}], "prompt", "choices")
    with pytest.raises(RecipeError) as err:
        require_columns(task, [{"z": 1, "prompt": 2}], "prompt", "choices", "answer")
    assert str(err.value) == "eval task 'mc' (multiple_choice): rows need column(s) ['choices', 'answer']; d.jsonl has ['prompt', 'z']"


def test_encodings_put_bos_first_and_no_other_special_tokens():
    from tokenizers import processors

    adds_bos = build_char_tokenizer()  # a tokenizer that adds bos itself, as Llama's do
    adds_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert adds_bos("ab")["input_ids"][0] == 1  # (the setup works)
    plain = [TOK.convert_tokens_to_ids(c) for c in "ab"]
    assert encode_plain(adds_bos, "ab") == plain and encode_prompt(adds_bos, "ab") == [1, *plain]
    assert bos_ids(TOK) == [1] and bos_ids(SimpleNamespace(bos_token_id=None)) == []
    assert bos_ids(SimpleNamespace(bos_token_id=0)) == [0]  # id 0 is a real id


def test_data_stamp_identifies_the_files_state(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    path.write_text("abc")
    st = os.stat(path)
    assert _data_stamp(EvalTask(name="a", kind="perplexity", data=str(path))) == f"{path.resolve()}:3:{st.st_mtime_ns}"
    monkeypatch.chdir(tmp_path)
    Path("lab:shift").write_text("a file of that name")
    assert _data_stamp(EvalTask(name="a", kind="perplexity", data="lab:shift")) == "lab:shift"  # a lab ref, not the file
    assert _data_stamp(EvalTask(name="a", kind="perplexity")) == "None"
    assert _data_stamp(EvalTask(name="a", kind="perplexity", data="org/missing")) == "org/missing"


def test_cached_encoding_builds_once_per_state(tmp_path):
    clear_encoding_cache()
    path = tmp_path / "r.jsonl"
    path.write_text("abc")
    task = EvalTask(name="a", kind="perplexity", data=str(path))
    built = []
    build = lambda: built.append(1) or len(built)  # noqa: E731
    assert [cached_encoding(task, TOK, "ppl", build) for _ in range(2)] == [1, 1]
    assert cached_encoding(task, TOK, "other", build) == 2  # another purpose
    assert cached_encoding(task.model_copy(update={"limit": 1}), TOK, "ppl", build) == 3  # another definition
    other_tok = build_char_tokenizer()
    assert cached_encoding(task, other_tok, "ppl", build) == 4  # another tokenizer
    path.write_text("abcd")  # the file changed
    assert cached_encoding(task, TOK, "ppl", build) == 5 and cached_encoding(task, TOK, "ppl", build) == 5
    assert cached_encoding(task, "no weakref", "ppl", build) == 6 and cached_encoding(task, "no weakref", "ppl", build) == 7
    clear_encoding_cache()
    assert len(rows._ENCODED) == 0 and cached_encoding(task, TOK, "ppl", build) == 8


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def test_right_pad_by_hand():
    ids, mask = right_pad([[5, 6, 7], [8], []], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]] and mask.dtype == torch.long


def test_pad_id_of():
    assert pad_id_of(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_id_of(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert type(pad_id_of(SimpleNamespace(pad_token_id=torch.tensor(3), eos_token_id=None))) is int


def test_length_batches_longest_first():
    assert list(length_batches([[1], [1, 1, 1], [1, 1], [1, 1, 1], [1]], 2)) == [[1, 3], [2, 0], [4]]
    assert list(length_batches([[1], [1, 1]], 5)) == [[1, 0]]
    assert list(length_batches([], 3)) == []


class Recorder(torch.nn.Module):
    """Returns ``ids * 10 (+1 while the adapter is disabled)`` as logits; records each call's keyword arguments."""

    def __init__(self, peft: bool = False):
        super().__init__()
        self.calls, self.disabled = [], False
        if peft:
            self.disable_adapter = self._disable

    @contextlib.contextmanager
    def _disable(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(logits=kwargs["input_ids"].float() * 10 + self.disabled)


def test_model_and_base_logits():
    ids, mask = torch.tensor([[1, 2]]), torch.tensor([[1, 0]])
    model = Recorder()
    assert model_logits(model)(ids, mask).tolist() == [[10.0, 20.0]]
    (call,) = model.calls
    assert call["input_ids"] is ids and call["attention_mask"] is mask and call["use_cache"] is False
    base = Recorder()
    assert base_logits(model, base)(ids, mask).tolist() == [[10.0, 20.0]] and len(base.calls) == 1
    peft = Recorder(peft=True)
    assert base_logits(peft, None)(ids, mask).tolist() == [[11.0, 21.0]]  # adapter disabled during the call
    assert peft.disabled is False and peft.calls[0]["attention_mask"] is mask and peft.calls[0]["use_cache"] is False
    with pytest.raises(RecipeError) as err:
        base_logits(model, None)
    assert str(err.value) == "kl_to_base needs the base model: pass base_model= (full fine-tuning) or a PEFT model"


def test_eval_mode_restores_the_previous_mode():
    model = torch.nn.Linear(1, 1).train()
    with eval_mode(model) as inside:
        assert inside is model and not model.training
    assert model.training
    model.eval()
    with pytest.raises(KeyError), eval_mode(model):
        model.train()
        raise KeyError
    assert not model.training


# ---------------------------------------------------------------------------------------------
# suite
# ---------------------------------------------------------------------------------------------
def test_check_unique_names():
    check_unique_names([EvalTask(name="a", kind="perplexity"), EvalTask(name="b", kind="perplexity")])
    with pytest.raises(RecipeError) as err:
        check_unique_names([EvalTask(name=n, kind="perplexity") for n in ["a", "b", "a"]])
    assert str(err.value) == "eval: two tasks are named 'a'; task names must be unique across target and preserve"


def test_evaluate_suite_runs_each_task_in_eval_mode(monkeypatch):
    seen = []

    def run_task(model, tokenizer, task, batch_size, base_model):
        seen.append((task.name, tokenizer, batch_size, base_model, model.training, base_model.training))
        return TaskResult(task.name, task.kind, "m", len(seen), 1)

    monkeypatch.setattr(suite, "run_task", run_task)
    model, base = torch.nn.Linear(1, 1).train(), torch.nn.Linear(1, 1).train()
    tasks = [EvalTask(name=n, kind="perplexity") for n in ["x", "y"]]
    started = []
    out = evaluate_suite(model, "tok", tasks, 4, base, on_task=lambda t: started.append(t.name))
    assert seen == [("x", "tok", 4, base, False, False), ("y", "tok", 4, base, False, False)]
    assert list(out) == ["x", "y"] and [r.score for r in out.values()] == [1, 2] and started == ["x", "y"]
    assert model.training and base.training  # restored
    monkeypatch.setattr(suite, "run_task", lambda m, t, task, b, base_model: TaskResult(task.name, "k", "m", 0.0, 1))
    assert list(evaluate_suite(model, "tok", tasks, 4)) == ["x", "y"]  # no base model, no callback
    with pytest.raises(RecipeError, match="two tasks are named 'x'"):
        evaluate_suite(model, "tok", [tasks[0], tasks[0]], 4)


def test_retention_metrics_by_hand():
    def r(name, score, higher=True, unit="fraction"):
        return TaskResult(name, "k", "m", score, 1, higher_is_better=higher, unit=unit)

    base = {"a": r("a", 0.8), "p": r("p", 10.0, False, "ratio"), "kl": r("kl", 0.0, False, "nats")}
    tuned = {"a": r("a", 0.4), "p": r("p", 12.5, False, "ratio"), "kl": r("kl", 0.3, False, "nats"), "new": r("new", 0.9)}
    assert retention_metrics(base, tuned) == {"preserve/a": 0.4, "retention/a": 0.5, "preserve/p": 12.5,
                                              "retention/p": 0.8, "preserve/kl": 0.3, "preserve/new": 0.9,
                                              "retention/mean": pytest.approx(0.65)}  # fmt: skip
    assert retention_metrics({"a": r("a", 0.5)}, {"a": r("a", 0.25), "b": r("b", 1.0)}, prefix="target") == {
        "target/a": 0.25, "retention/a": 0.5, "target/b": 1.0, "retention/mean": 0.5}  # fmt: skip
    assert retention_metrics({}, {"kl": r("kl", 0.3, False, "nats")}) == {"preserve/kl": 0.3}
