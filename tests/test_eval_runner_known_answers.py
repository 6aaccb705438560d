"""``ppft eval``'s flow (``preserve_core.evaluation.runner``) with model loading and scoring replaced by recorders.

What is checked is the orchestration, by hand: which checkpoint kind a folder is, which model is
loaded with which settings, what the base cache answers, which scores go into which report row,
and what lands in ``<run_dir>/eval``. The real models are exercised by ``tests/test_evaluation.py``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from preserve_core.errors import RecipeError
from preserve_core.evaluation import runner
from preserve_core.evaluation.cache import tokenizer_fingerprint
from preserve_core.evaluation.runner import (
    base_results,
    default_device,
    eval_model_config,
    kl_base_result,
    load_tuned,
    resolve_checkpoint,
    run_eval,
)
from preserve_core.recipe_schema import EvalConfig, EvalTask, ModelConfig
from preserve_core.report import TaskResult
from tests.conftest import build_char_tokenizer

TOK = build_char_tokenizer()


# ---------------------------------------------------------------------------------------------
# resolve_checkpoint, eval_model_config, default_device, kl_base_result
# ---------------------------------------------------------------------------------------------
def folder(path, *files):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_resolve_checkpoint_tells_adapters_from_models(tmp_path):
    final = folder(tmp_path / "run" / "final", "adapter_config.json", "adapter_model.safetensors")
    assert resolve_checkpoint(tmp_path / "run", None) == (final, "adapter")
    full = folder(tmp_path / "full", "config.json", "model.safetensors")
    assert resolve_checkpoint(tmp_path / "run", str(full)) == (full, "full")
    assert resolve_checkpoint(tmp_path / "run", full) == (full, "full")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["config.json"], "{p}: expected a PEFT adapter (adapter_config.json) or a model (config.json + *.safetensors)"),
        (["model.safetensors"], "{p}: expected a PEFT adapter (adapter_config.json) or a model (config.json + *.safetensors)"),
        (["trainable.safetensors", "state.pt"], "{p} is a resumable training checkpoint, not a model: evaluate the run's final/ folder"),
    ],
)  # fmt: skip
def test_resolve_checkpoint_refuses_other_folders(tmp_path, files, message):
    path = folder(tmp_path / "ckpt", *files)
    with pytest.raises(RecipeError) as err:
        resolve_checkpoint(tmp_path, path)
    assert str(err.value) == message.format(p=path)


def test_resolve_checkpoint_missing_folders(tmp_path):
    with pytest.raises(RecipeError) as err:
        resolve_checkpoint(tmp_path / "run", tmp_path / "nope")
    assert str(err.value) == (f"--checkpoint {tmp_path / 'nope'} does not exist: run `ppft train` first, "
                              "or pass --checkpoint PATH (a model or PEFT adapter folder)")  # fmt: skip
    with pytest.raises(RecipeError) as err:
        resolve_checkpoint(tmp_path / "run", None)
    assert str(err.value).startswith(f"no trained model at {tmp_path / 'run' / 'final'}: run `ppft train` first")


def test_eval_model_config_turns_off_gradient_checkpointing():
    cfg = ModelConfig(name_or_path="org/model", revision="v2", gradient_checkpointing=True, dtype="bfloat16")
    same = eval_model_config(cfg)
    assert same == cfg.model_copy(update={"gradient_checkpointing": False})
    moved = eval_model_config(cfg, "/runs/x/final")
    assert moved == cfg.model_copy(update={"gradient_checkpointing": False, "name_or_path": "/runs/x/final",
                                           "revision": None})  # fmt: skip
    assert isinstance(eval_model_config(cfg, __import__("pathlib").Path("/a")).name_or_path, str)
    assert cfg.gradient_checkpointing is True  # the recipe's own settings are left alone


def test_default_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")


def test_kl_base_result_is_zero_by_definition():
    task = EvalTask(name="drift", kind="kl_to_base", data="x.jsonl")
    assert kl_base_result(task) == TaskResult("drift", "kl_to_base", "kl", 0.0, 0, 0.0, higher_is_better=False,
                                              unit="nats")  # fmt: skip
    assert isinstance(kl_base_result(task).score, float)


# ---------------------------------------------------------------------------------------------
# load_tuned
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def loads(monkeypatch) -> list:
    """``runner.load_model`` and ``PeftModel.from_pretrained`` replaced by recorders."""
    import peft

    calls: list = []

    def load_model(cfg, device):
        calls.append(("load", cfg, device))
        return SimpleNamespace(name=cfg.name_or_path)

    def from_pretrained(base, path):
        calls.append(("peft", base, path))
        return SimpleNamespace(name="peft", base=base)

    monkeypatch.setattr(runner, "load_model", load_model)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", from_pretrained)
    return calls


def test_load_tuned_attaches_adapters_to_the_base_or_loads_a_model(loads, tmp_path):
    recipe = SimpleNamespace(model=ModelConfig(name_or_path="base", gradient_checkpointing=True))
    base = SimpleNamespace(name="given")
    assert load_tuned(recipe, tmp_path, "adapter", base, "cpu").base is base
    assert loads == [("peft", base, str(tmp_path))]
    loads.clear()
    tuned = load_tuned(recipe, tmp_path, "adapter", None, "meta")
    assert tuned.base.name == "base"
    assert loads == [("load", eval_model_config(recipe.model), "meta"), ("peft", tuned.base, str(tmp_path))]
    loads.clear()
    assert load_tuned(recipe, tmp_path, "full", base, "meta").name == str(tmp_path)
    assert loads == [("load", eval_model_config(recipe.model, tmp_path), "meta")]


# ---------------------------------------------------------------------------------------------
# base_results
# ---------------------------------------------------------------------------------------------
class FakeCache:
    def __init__(self, stored: dict):
        self.stored, self.put_calls = dict(stored), []

    def get(self, task):
        return self.stored.get(task.name)

    def put(self, task, result):
        self.put_calls.append((task.name, result))


def scored(name: str, score: float, kind: str = "exact_match", samples=None) -> TaskResult:
    return TaskResult(name, kind, "m", score, 4, 0.05, samples=samples or [])


@pytest.fixture
def suites(monkeypatch) -> list:
    """``runner.evaluate_suite`` replaced: model ``m`` scores ``m.score`` on every task; calls are recorded."""
    calls: list = []

    def evaluate_suite(model, tokenizer, tasks, batch_size, base_model=None, on_task=None):
        calls.append({"model": model.name, "tokenizer": tokenizer, "tasks": [t.name for t in tasks],
                      "batch_size": batch_size, "base_model": getattr(base_model, "name", base_model)})  # fmt: skip
        for t in tasks:
            on_task(t)
        return {t.name: scored(t.name, model.score, t.kind, [{"model": model.name}] if t.name == "t" else []) for t in tasks}

    monkeypatch.setattr(runner, "evaluate_suite", evaluate_suite)
    return calls


def test_base_results_reads_the_cache_and_scores_the_rest(suites):
    tasks = [EvalTask(name=n, kind=k, data="x.jsonl") for n, k in [("a", "exact_match"), ("kl", "kl_to_base"),
                                                                    ("b", "perplexity"), ("c", "exact_match")]]  # fmt: skip
    cache = FakeCache({"b": scored("b", 0.9)})
    said: list = []
    found, cached = base_results(SimpleNamespace(name="base", score=0.5), "tok", tasks, 7, cache, said.append)
    assert list(found) == ["a", "kl", "b", "c"] and cached == {"b"}
    assert found["b"].score == 0.9 and found["a"].score == 0.5 and found["c"].score == 0.5
    assert found["kl"] == kl_base_result(tasks[1])
    assert suites == [{"model": "base", "tokenizer": "tok", "tasks": ["a", "c"], "batch_size": 7, "base_model": None}]
    assert said == ["base: a", "base: c"]
    assert [(name, r.score) for name, r in cache.put_calls] == [("a", 0.5), ("c", 0.5)]
    suites.clear()
    everything = FakeCache({"a": scored("a", 0.1), "b": scored("b", 0.2), "c": scored("c", 0.3)})
    found, cached = base_results(None, "tok", tasks, 7, everything, said.append)
    assert suites == [] and everything.put_calls == [] and cached == {"a", "b", "c"}  # nothing left to run
    assert [found[n].score for n in ["a", "kl", "b", "c"]] == [0.1, 0.0, 0.2, 0.3]


# ---------------------------------------------------------------------------------------------
# run_eval
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def harness(monkeypatch, tmp_path, suites):
    """Loading replaced: the base scores 0.5 on every task, the tuned model 0.25; calls are recorded."""
    calls: list = []

    def load_model(cfg, device):
        calls.append(("load", cfg.name_or_path, cfg.gradient_checkpointing, device))
        return SimpleNamespace(name=cfg.name_or_path, score=0.5 if cfg.name_or_path == "org/base" else 0.25)

    monkeypatch.setattr(runner, "load_model", load_model)
    monkeypatch.setattr(runner, "load_tokenizer", lambda cfg: calls.append(("tokenizer", cfg.name_or_path)) or TOK)
    monkeypatch.setattr(runner, "model_fingerprint", lambda model: f"fp-{model.name}")
    monkeypatch.setattr(runner, "default_device", lambda: "dev")
    monkeypatch.delenv("PPFT_HOME", raising=False)
    return SimpleNamespace(calls=calls, suites=suites)


def recipe(tmp_path, target=("t",), preserve=("p",), fail_on_regression=None, name="my-recipe", kinds=None):
    kinds = kinds or {}
    task = lambda n: EvalTask(name=n, kind=kinds.get(n, "exact_match"), data=str(tmp_path / f"{n}.jsonl"))  # noqa: E731
    evals = EvalConfig(target=[task(n) for n in target], preserve=[task(n) for n in preserve], batch_size=3,
                       fail_on_regression=fail_on_regression)  # fmt: skip
    run = tmp_path / "run"
    return SimpleNamespace(name=name, model=ModelConfig(name_or_path="org/base", gradient_checkpointing=True),
                           eval=evals, run_dir=lambda: run)  # fmt: skip


def test_run_eval_full_model_report_by_hand(harness, tmp_path):
    """Base 0.5 and tuned 0.25 on target t and preserve p: -25 points each, retention 0.5; the gate at 20 fails p."""
    r = recipe(tmp_path, fail_on_regression=50.0)
    final = folder(tmp_path / "run" / "final", "config.json", "model.safetensors")
    said: list = []
    report = run_eval(r, fail_on_regression=20.0, progress=said.append)
    assert (report.recipe, report.base_model, report.checkpoint, report.checkpoint_kind, report.base_fingerprint,
            report.fail_on_regression) == ("my-recipe", "org/base", str(final), "full", "fp-org/base", 20.0)  # fmt: skip
    assert [(t.suite, t.name, t.base, t.tuned, t.points, t.retention, t.regressed, t.base_cached) for t in report.tasks] == [
        ("target", "t", 0.5, 0.25, -25.0, 0.5, False, False),
        ("preserve", "p", 0.5, 0.25, -25.0, 0.5, True, False),
    ]  # fmt: skip
    assert report.samples == {"t": {"base": [{"model": "org/base"}], "tuned": [{"model": str(final)}]}}
    assert harness.calls == [("tokenizer", "org/base"), ("load", "org/base", False, "dev"), ("load", str(final), False, "dev")]
    assert harness.suites == [
        {"model": "org/base", "tokenizer": TOK, "tasks": ["t", "p"], "batch_size": 3, "base_model": None},
        {"model": str(final), "tokenizer": TOK, "tasks": ["t", "p"], "batch_size": 3, "base_model": None},
    ]  # a full model without kl_to_base tasks: the base is dropped before the tuned model loads
    assert said == ["base: t", "base: p", "tuned: t", "tuned: p"]
    written = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert written["summary"] == {"new_task_gain_points": -25.0, "mean_retention": 0.5, "regressions": ["p"], "passed": False}
    assert (tmp_path / "run" / "eval" / "report.md").read_text().startswith("# ppft eval: my-recipe\n")


def test_run_eval_second_checkpoint_reads_the_base_from_the_cache(harness, tmp_path):
    r = recipe(tmp_path, fail_on_regression=30.0, name=None)
    folder(tmp_path / "run" / "final", "config.json", "model.safetensors")
    first = run_eval(r, fail_on_regression=0.0)
    assert first.fail_on_regression == 0.0 and not first.passed  # 0 overrides the recipe's 30
    other = folder(tmp_path / "other", "config.json", "model.safetensors")
    harness.suites.clear()
    second = run_eval(r, checkpoint=other)
    assert second.recipe == "recipe" and second.checkpoint == str(other) and second.fail_on_regression == 30.0
    assert [t.base_cached for t in second.tasks] == [True, True] and second.passed  # -25 is within 30 points
    assert [s["model"] for s in harness.suites] == [str(other)]  # only the tuned model ran
    assert second.samples == {"t": {"base": [{"model": "org/base"}], "tuned": [{"model": str(other)}]}}
    entries = [json.loads(p.read_text()) for p in (tmp_path / "run" / "eval" / "cache").glob("*.json")]
    assert [e["identity"] for e in entries] == [{"version": 1, "model": "fp-org/base", "dtype": "float32",
                                                  "tokenizer": tokenizer_fingerprint(TOK)}] * 2  # fmt: skip


def test_run_eval_keeps_the_base_for_kl_of_a_full_model(harness, tmp_path):
    r = recipe(tmp_path, target=(), preserve=("p", "drift"), kinds={"drift": "kl_to_base"})
    folder(tmp_path / "run" / "final", "config.json", "model.safetensors")
    report = run_eval(r)
    assert harness.suites[-1]["base_model"] == "org/base"  # a full model's KL is against the loaded base
    assert [(t.name, t.base, t.points) for t in report.tasks] == [("p", 0.5, -25.0), ("drift", 0.0, None)]
    assert report.fail_on_regression is None and report.passed and report.samples == {}


def test_run_eval_adapters_use_the_base_instance(harness, tmp_path, monkeypatch):
    import peft

    bases = []
    monkeypatch.setattr(peft.PeftModel, "from_pretrained",
                        lambda base, path: bases.append(base) or SimpleNamespace(name=path, score=0.25))  # fmt: skip
    r = recipe(tmp_path, preserve=("p", "drift"), kinds={"drift": "kl_to_base"})
    final = folder(tmp_path / "run" / "final", "adapter_config.json")
    report = run_eval(r)
    assert report.checkpoint_kind == "adapter" and [t.tuned for t in report.tasks] == [0.25, 0.25, 0.25]
    assert harness.suites[-1] == {"model": str(final), "tokenizer": TOK, "tasks": ["t", "p", "drift"],
                                  "batch_size": 3, "base_model": None}  # KL: the adapter disabled, not a base copy
    assert harness.calls == [("tokenizer", "org/base"), ("load", "org/base", False, "dev")]  # one model in memory
    assert [b.name for b in bases] == ["org/base"]


def test_run_eval_refuses_empty_or_ambiguous_suites(harness, tmp_path):
    with pytest.raises(RecipeError) as err:
        run_eval(recipe(tmp_path, target=(), preserve=()))
    assert str(err.value) == ("the recipe's eval: section has no tasks: add eval.target and/or eval.preserve "
                              "(see docs/eval.md)")  # fmt: skip
    with pytest.raises(RecipeError, match="two tasks are named 't'"):
        run_eval(recipe(tmp_path, target=("t",), preserve=("t",)))
    assert harness.calls == []  # refused before anything loads
