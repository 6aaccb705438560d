"""``kind: lm_eval`` (``preserve_core.evaluation.lmeval``) with lm-eval's entry points replaced by recorders.

``simple_evaluate``'s output is written out by hand in lm-eval's layout (``results``,
``higher_is_better``, ``n-samples``; metric keys ``"<metric>,<filter>"``), so nothing is run or
downloaded; the real harness is exercised by ``tests/test_evaluation.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from preserve_core.errors import PPFTError, RecipeError
from preserve_core.evaluation import lmeval
from preserve_core.evaluation.lmeval import (
    FRACTION_METRICS,
    INSTALL_HINT,
    _stderr,
    import_lm_eval,
    primary_metric,
    run_lm_eval_task,
    summarize,
    task_manager,
)
from preserve_core.recipe_schema import EvalTask


def lm_task(*names: str, include: str | None = None, limit: int | None = None) -> EvalTask:
    return EvalTask(name="lm", kind="lm_eval", lm_eval_tasks=list(names), lm_eval_include_path=include, limit=limit)


# ---------------------------------------------------------------------------------------------
# import_lm_eval and task_manager
# ---------------------------------------------------------------------------------------------
def test_import_lm_eval_returns_the_entry_points():
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    assert import_lm_eval() == (lm_eval, HFLM, TaskManager)


def test_import_lm_eval_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(RecipeError) as err:
        import_lm_eval()
    assert str(err.value) == INSTALL_HINT == "kind: lm_eval needs lm-evaluation-harness: pip install 'ppft[lmeval]'"


class FakeTaskManager:
    """Records its construction; the include folder defines ``t1`` and ``t2``, the defaults ``arc``."""

    made: list[dict] = []

    def __init__(self, include_path=None, include_defaults=True):
        FakeTaskManager.made.append({"include_path": include_path, "include_defaults": include_defaults})
        self.all_tasks = (["t1", "t2"] if include_path else []) + (["arc"] if include_defaults else [])


@pytest.fixture
def managers():
    FakeTaskManager.made = []
    return FakeTaskManager.made


def test_task_manager_indexes_only_the_include_folder_when_it_has_every_task(managers):
    manager = task_manager(lm_task("t1", "t2", include="/tasks"), FakeTaskManager)
    assert managers == [{"include_path": "/tasks", "include_defaults": False}]
    assert manager.all_tasks == ["t1", "t2"]


def test_task_manager_adds_lm_evals_own_tasks_otherwise(managers):
    manager = task_manager(lm_task("t1", "arc", include="/tasks"), FakeTaskManager)
    assert managers == [{"include_path": "/tasks", "include_defaults": False},
                        {"include_path": "/tasks", "include_defaults": True}]  # fmt: skip
    assert manager.all_tasks == ["t1", "t2", "arc"]
    FakeTaskManager.made.clear()
    assert task_manager(lm_task("arc"), FakeTaskManager).all_tasks == ["arc"]
    assert managers == [{"include_path": None, "include_defaults": True}]


# ---------------------------------------------------------------------------------------------
# primary_metric, _stderr, summarize
# ---------------------------------------------------------------------------------------------
def test_primary_metric_is_the_first_non_stderr_metric():
    per_task = {"alias": "x", "acc_stderr,none": 0.1, "acc,none": 0.5, "acc_norm,none": 0.6}
    assert primary_metric(per_task) == ("acc", "acc,none")
    assert primary_metric({"exact_match,strict-match": 0.25}) == ("exact_match", "exact_match,strict-match")
    assert primary_metric({"em,strip,lower": 0.25}) == ("em", "em,strip,lower")  # the metric ends at the first comma
    with pytest.raises(PPFTError, match=r"lm-eval reported no metric: \['acc_stderr,none', 'alias'\]"):
        primary_metric({"alias": "x", "acc_stderr,none": 0.1})


def test_stderr_reads_the_matching_key_when_finite():
    per_task = {"acc,none": 0.5, "acc_stderr,none": 0.125, "f1,flt": 0.5, "f1_stderr,flt": "N/A", "em,x": 1.0,
                "em_stderr,x": math.nan, "mc1,none": 0.5, "mc1_stderr,none": 1, "mc2,none": 0.5}  # fmt: skip
    assert _stderr(per_task, "acc,none") == 0.125
    assert _stderr(per_task, "mc1,none") == 1.0 and isinstance(_stderr(per_task, "mc1,none"), float)
    assert _stderr(per_task, "f1,flt") is None and _stderr(per_task, "em,x") is None
    assert _stderr(per_task, "mc2,none") is None
    assert _stderr({"acc,none": 0.5, "acc_stderr,other": 0.1}, "acc,none") is None  # the filter must match
    assert _stderr({"em,a,b": 0.5, "em_stderr,a,b": 0.25}, "em,a,b") == 0.25  # a filter name holding a comma


def two_tasks(**over) -> dict:
    results = {
        "results": {
            "t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.3, "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A"},
            "t2": {"alias": "t2", "exact_match,none": 0.25, "exact_match_stderr,none": 0.4},
            "unused": {"acc,none": 1.0},
        },
        "higher_is_better": {"t1": {"acc": True, "acc_norm": True}, "t2": {"exact_match": True}},
        "n-samples": {"t1": {"original": 12, "effective": 10}, "t2": {"original": 7, "effective": 6}},
    }  # fmt: skip
    results.update(over)
    return results


def test_summarize_two_tasks_by_hand():
    """Score (0.5 + 0.25) / 2; stderr sqrt(0.3^2 + 0.4^2) / 2 = 0.25; n = 10 + 6 effective samples."""
    r = summarize(lm_task("t1", "t2"), two_tasks())
    assert (r.name, r.kind, r.metric, r.score, r.n) == ("lm", "lm_eval", "acc/exact_match", 0.375, 16)
    assert r.stderr == pytest.approx(0.25) and r.higher_is_better is True and r.unit == "fraction"
    assert r.extra == {"t1/acc": 0.5, "t1/acc_stderr": 0.3, "t1/acc_norm": 0.75, "t2/exact_match": 0.25,
                       "t2/exact_match_stderr": 0.4}  # fmt: skip


def test_summarize_defaults_and_units():
    bare = two_tasks()
    del bare["higher_is_better"], bare["n-samples"]
    r = summarize(lm_task("t1"), bare)  # no direction given: higher is better; no counts: n = 0
    assert r.higher_is_better is True and r.n == 0 and r.stderr == pytest.approx(0.3) and r.metric == "acc"
    ppl = {"results": {"w": {"word_perplexity,none": 20.0, "word_perplexity_stderr,none": "N/A"}},
           "higher_is_better": {"w": {"word_perplexity": False}}, "n-samples": {"w": {"effective": 3}}}  # fmt: skip
    r = summarize(lm_task("w"), ppl)
    assert (r.metric, r.score, r.stderr, r.higher_is_better, r.unit, r.n) == ("word_perplexity", 20.0, None, False,
                                                                              "ratio", 3)  # fmt: skip
    mixed = two_tasks()
    mixed["results"]["t2"] = {"word_perplexity,none": 20.0, "word_perplexity_stderr,none": 2.0}
    mixed["higher_is_better"]["t2"] = {"word_perplexity": True}
    assert summarize(lm_task("t1", "t2"), mixed).unit == "ratio"  # one metric outside the fraction set
    assert summarize(lm_task("t2"), two_tasks()).unit == "fraction"
    every = {"results": {m: {f"{m},none": 0.5} for m in sorted(FRACTION_METRICS)}}
    assert summarize(lm_task(*sorted(FRACTION_METRICS)), every).unit == "fraction"  # all ten at once
    commas = {"results": {"t": {"em,strip,lower": 0.5, "em_stderr,strip,lower": 0.1}}}
    assert summarize(lm_task("t"), commas).extra == {"t/em": 0.5, "t/em_stderr": 0.1}
    assert {"acc", "acc_norm", "exact_match", "em", "f1", "mcc", "mc1", "mc2", "pass@1", "brier_score"} == FRACTION_METRICS


def test_summarize_refuses_missing_results_and_mixed_directions():
    with pytest.raises(RecipeError, match="eval task 'lm': lm-eval returned no result for 'missing'"):
        summarize(lm_task("t1", "missing"), two_tasks())
    mixed = two_tasks()
    mixed["higher_is_better"]["t2"] = {"exact_match": False}
    with pytest.raises(RecipeError, match="eval task 'lm': its lm-eval tasks mix higher- and lower-is-better"):
        summarize(lm_task("t1", "t2"), mixed)
    assert summarize(lm_task("t2"), mixed).higher_is_better is False  # one direction, whichever it is


# ---------------------------------------------------------------------------------------------
# run_lm_eval_task
# ---------------------------------------------------------------------------------------------
class FakeHFLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def fake_harness(monkeypatch, output) -> list[dict]:
    calls: list[dict] = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return output

    FakeTaskManager.made = []
    monkeypatch.setattr(lmeval, "import_lm_eval", lambda: (SimpleNamespace(simple_evaluate=simple_evaluate),
                                                           FakeHFLM, FakeTaskManager))  # fmt: skip
    return calls


def test_run_lm_eval_task_wraps_the_model_and_summarizes(monkeypatch):
    calls = fake_harness(monkeypatch, two_tasks())
    model, tokenizer = object(), object()
    r = run_lm_eval_task(model, tokenizer, lm_task("t1", include="/tasks", limit=5), batch_size=3)
    (call,) = calls
    assert call["model"].kwargs == {"pretrained": model, "tokenizer": tokenizer, "batch_size": 3}
    assert call["task_manager"].all_tasks == ["t1", "t2"]  # the include folder alone
    assert {k: v for k, v in call.items() if k not in ("model", "task_manager")} == {
        "tasks": ["t1"], "limit": 5, "log_samples": False, "bootstrap_iters": 1000}  # fmt: skip
    assert (r.name, r.metric, r.score, r.n, r.stderr) == ("lm", "acc", 0.5, 10, pytest.approx(0.3))


def test_run_lm_eval_task_scores_what_the_harness_returned(monkeypatch):
    fake_harness(monkeypatch, two_tasks())
    r = run_lm_eval_task(object(), object(), lm_task("t1", "t2"), batch_size=2)
    assert (r.metric, r.score, r.n, r.stderr) == ("acc/exact_match", 0.375, 16, pytest.approx(0.25))


def test_run_lm_eval_task_errors(monkeypatch):
    fake_harness(monkeypatch, None)
    with pytest.raises(RecipeError, match=r"eval task 'lm': kind lm_eval needs lm_eval_tasks: \[<task name>, \.\.\.\]"):
        run_lm_eval_task(object(), object(), lm_task(), batch_size=2)
    with pytest.raises(RecipeError, match=r"eval task 'lm': lm-eval returned nothing \(not the main process\?\)"):
        run_lm_eval_task(object(), object(), lm_task("t1"), batch_size=2)
