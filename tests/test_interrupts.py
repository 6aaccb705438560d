"""Ctrl-C: a second Ctrl-C during the checkpoint write neither loses that checkpoint nor leaves the run
without a resumable one; a Ctrl-C during a periodic save lets it finish and does not rewrite it."""

from __future__ import annotations

import os
import signal

import pytest

from preserve_core import checkpoint as checkpoint_module
from preserve_core import training
from preserve_core.checkpoint import list_checkpoints
from preserve_core.checkpoint_integrity import checkpoint_problem
from preserve_core.recipe import load_recipe


def _ctrl_c_during_writes(monkeypatch, on_calls: set[int]) -> dict:
    """Press Ctrl-C (a real SIGINT to this process) in the middle of the n-th checkpoint write, n in ``on_calls``."""
    original = checkpoint_module.write_checksums
    calls = {"n": 0}

    def pressing(folder):
        calls["n"] += 1
        if calls["n"] in on_calls:
            os.kill(os.getpid(), signal.SIGINT)
        return original(folder)

    monkeypatch.setattr(checkpoint_module, "write_checksums", pressing)
    return calls


def _train(path, resume=False):
    try:
        return training.train(load_recipe(path), resume=resume, show_progress=False)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the checkpoint write")


def test_second_ctrl_c_during_the_interrupt_checkpoint(write_recipe, monkeypatch):
    original = training.TrainingLoop.one_step
    steps = {"n": 0}

    def first_ctrl_c_at_step_4(self):
        steps["n"] += 1
        if steps["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(training.TrainingLoop, "one_step", first_ctrl_c_at_step_4)
    _ctrl_c_during_writes(monkeypatch, on_calls={1})
    path = write_recipe(training={"max_steps": 6})
    result = _train(path)
    assert result.interrupted and result.steps == 3
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000003"]
    assert checkpoint_problem(result.run_dir / "checkpoint-000003") is None
    assert not list(result.run_dir.glob(".tmp-*"))
    monkeypatch.setattr(training.TrainingLoop, "one_step", original)
    assert _train(path, resume=True).steps == 6


def test_ctrl_c_during_a_periodic_save_lets_it_finish(write_recipe, monkeypatch):
    writes = _ctrl_c_during_writes(monkeypatch, on_calls={1})
    path = write_recipe(training={"max_steps": 6, "save_every": 2})
    result = _train(path)
    assert result.interrupted and result.steps == 2
    assert writes["n"] == 1  # the finished checkpoint is not rewritten (a rewrite replaces it in two moves)
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000002"]
    assert checkpoint_problem(result.run_dir / "checkpoint-000002") is None
    assert _train(path, resume=True).steps == 6
