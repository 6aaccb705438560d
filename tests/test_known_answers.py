"""Known answers, computed by hand, on inputs where a plausible bug changes the result.

Each test names the bug it is there to catch (found by mutating the code: issue 13, item 11).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from preserve_core.evaluation import tasks as task_kinds
from preserve_core.methods.kl_terms import full_kl, topk_kl
from preserve_core.recipe_schema import EvalTask
from preserve_core.report import TaskResult, compare, retention
from preserve_core.retention import RetentionTracker
from preserve_core.training import epoch_batches


def _logits(probs: list[list[float]], temperature: float) -> torch.Tensor:
    """Logits whose tempered softmax is ``probs``: ``z = T log p`` (so ``softmax(z / T) = p``). [1, P, V]."""
    return temperature * torch.tensor(probs, dtype=torch.float64).log()[None]


def test_full_kl_is_base_to_student_not_reversed():
    """KL(p0 || p) with p0 = (0.9, 0.1), p = (0.5, 0.5): 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064;
    the reversed KL(p || p0) is 0.5 ln(5/9) + 0.5 ln 5 = 0.510826. A second, masked position is ignored."""
    base = _logits([[0.9, 0.1], [0.2, 0.8]], temperature=2.0)
    student = _logits([[0.5, 0.5], [0.9, 0.1]], temperature=2.0)
    mask = torch.tensor([[1, 0]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert abs(expected - 0.368064) < 1e-6
    assert abs(float(full_kl(student, base, mask, 2.0)) - expected) < 1e-6


def test_topk_kl_coarsens_to_top_k_plus_tail():
    """p0 = (0.7, 0.2, 0.1), p = (0.4, 0.4, 0.2), k = 1 (class 0): (0.7, 0.3) vs (0.4, 0.6),
    0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6) = 0.183787; mean over two real positions (the same pair twice)."""
    student = _logits([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]], temperature=1.0)
    top_ids = torch.tensor([[[0], [0]]])
    top_logp0 = torch.tensor([[[math.log(0.7)], [math.log(0.7)]]])
    expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    value = float(topk_kl(student, top_ids, top_logp0, torch.ones(1, 2), 1.0))
    assert abs(value - expected) < 1e-5 and abs(expected - 0.183787) < 1e-6


def test_epoch_batches_differ_by_epoch_and_are_fixed_by_seed():
    """Each epoch is a fresh permutation (the same every run for a seed); ranks split it disjointly."""
    epochs = [epoch_batches(40, 4, seed=3, epoch=e, rank=0, world=1) for e in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[1] == epoch_batches(40, 4, seed=3, epoch=1, rank=0, world=1)
    assert epochs[0] != epoch_batches(40, 4, seed=4, epoch=0, rank=0, world=1)
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(40)) and all(len(b) == 4 for b in batches)
    ranks = [epoch_batches(40, 4, seed=3, epoch=2, rank=r, world=2) for r in range(2)]
    flat = [sorted(i for b in batches for i in b) for batches in ranks]
    assert not set(flat[0]) & set(flat[1]) and sorted(flat[0] + flat[1]) == list(range(40))
    assert [len(b) for b in epoch_batches(10, 4, seed=0, epoch=0, rank=0, world=1)] == [4, 4]  # last partial dropped


def _result(score: float, higher_is_better: bool = True, unit: str = "fraction") -> TaskResult:
    return TaskResult("t", "exact_match", "m", score, 100, None, higher_is_better, unit)


def test_retention_is_tuned_over_base_by_hand():
    assert retention(_result(0.8), _result(0.4)) == 0.5  # accuracy halved
    assert retention(_result(10.0, False, "ratio"), _result(20.0, False, "ratio")) == 0.5  # perplexity doubled
    assert retention(_result(0.0), _result(0.3)) is None
    assert retention(_result(1.0, False, "nats"), _result(2.0, False, "nats")) is None


def test_retention_during_training_by_hand():
    tracker = RetentionTracker.__new__(RetentionTracker)
    tracker.base = {"a": 0.8, "b": 0.5, "c": 0.0}
    tracker._scores = lambda model: {"a": 0.4, "b": 0.5, "c": 0.25}
    out = tracker.measure(model=None)
    assert out["retention/a"] == 0.5 and out["retention/b"] == 1.0 and math.isnan(out["retention/c"])
    assert out["preserve/a"] == 0.4
    tracker.base = {"a": 0.8, "b": 0.5}
    tracker._scores = lambda model: {"a": 0.4, "b": 0.5}
    assert tracker.measure(model=None)["retention/mean"] == 0.75


def test_regression_gate_at_its_threshold():
    """Fail when a preserve task drops by MORE than the threshold: 0.75 -> 0.5 is exactly 25 points."""
    base, tuned = _result(0.75), _result(0.5)
    assert compare("preserve", base, tuned, 25.0, False).points == -25.0
    assert not compare("preserve", base, tuned, 25.0, False).regressed
    assert compare("preserve", base, tuned, 24.5, False).regressed
    assert not compare("target", base, tuned, 0.0, False).regressed  # targets are never gated
    assert not compare("preserve", base, _result(0.75), 0.0, False).regressed  # no change passes threshold 0
    assert compare("preserve", base, _result(0.74), 0.0, False).regressed
    assert not compare("preserve", base, tuned, None, False).regressed


def test_exact_match_normalises_prediction_and_reference(monkeypatch):
    """'  ABC\\n' and 'abc ' match under strip + lower; 'x' and 'y' do not: score 1/2."""
    prompts = ["p1", "p2"]
    monkeypatch.setattr(task_kinds, "cached_encoding", lambda *a: (prompts, [[1], [2]], ["  ABC\n", "y"]))
    monkeypatch.setattr(task_kinds, "greedy_generate", lambda *a: ["abc ", "x"])
    task = EvalTask(name="em", kind="exact_match", data="lab:shift", normalize=["strip", "lower"])
    result = task_kinds.run_exact_match(SimpleNamespace(), None, task, batch_size=2)
    assert result.score == 0.5 and [s["correct"] for s in result.samples] == [True, False]
