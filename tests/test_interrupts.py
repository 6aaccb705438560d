"""Ctrl-C: a second Ctrl-C during the checkpoint write neither loses that checkpoint nor leaves the run
without a resumable one; a Ctrl-C during a periodic save lets it finish and does not rewrite it.
SIGTERM (a scheduler's preemption) is handled the same way, with exit 143."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import at_step, raise_keyboard_interrupt

from preserve_core import checkpoint as checkpoint_module
from preserve_core import training
from preserve_core.checkpoint import list_checkpoints
from preserve_core.checkpoint_integrity import checkpoint_problem
from preserve_core.recipe import load_recipe


def _signal_during_writes(monkeypatch, on_calls: set[int], signum: int = signal.SIGINT) -> dict:
    """Send a real ``signum`` (Ctrl-C's SIGINT by default) to this process in the middle of the n-th
    checkpoint write, n in ``on_calls``."""
    original = checkpoint_module.write_checksums
    calls = {"n": 0}

    def pressing(folder):
        calls["n"] += 1
        if calls["n"] in on_calls:
            os.kill(os.getpid(), signum)
        return original(folder)

    monkeypatch.setattr(checkpoint_module, "write_checksums", pressing)
    return calls


def _train(path, resume=False):
    try:
        return training.train(load_recipe(path), resume=resume, show_progress=False)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the checkpoint write")


def test_second_ctrl_c_during_the_interrupt_checkpoint(write_recipe, monkeypatch):
    original = at_step(monkeypatch, 4, raise_keyboard_interrupt)
    _signal_during_writes(monkeypatch, on_calls={1})
    path = write_recipe(training={"max_steps": 6})
    result = _train(path)
    assert result.interrupted and result.steps == 3
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000003"]
    assert checkpoint_problem(result.run_dir / "checkpoint-000003") is None
    assert not list(result.run_dir.glob(".tmp-*"))
    monkeypatch.setattr(training.TrainingLoop, "one_step", original)
    assert _train(path, resume=True).steps == 6


def test_ctrl_c_during_a_periodic_save_lets_it_finish(write_recipe, monkeypatch):
    writes = _signal_during_writes(monkeypatch, on_calls={1})
    path = write_recipe(training={"max_steps": 6, "save_every": 2})
    result = _train(path)
    assert result.interrupted and result.steps == 2
    assert writes["n"] == 1  # the finished checkpoint is not rewritten (a rewrite replaces it in two moves)
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000002"]
    assert checkpoint_problem(result.run_dir / "checkpoint-000002") is None
    assert _train(path, resume=True).steps == 6


def test_sigterm_saves_the_last_step_and_resume_ends_where_a_straight_run_does(write_recipe, monkeypatch):
    from safetensors.torch import load_file

    straight = _train(write_recipe("straight", training={"max_steps": 6}))
    at_step(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))  # a real SIGTERM to this process
    path = write_recipe("preempted", training={"max_steps": 6})
    result = _train(path)
    assert result.interrupted and result.terminated and result.steps == 3
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000003"]
    assert checkpoint_problem(result.run_dir / "checkpoint-000003") is None
    monkeypatch.undo()
    resumed = _train(path, resume=True)
    assert resumed.steps == 6 and not resumed.interrupted
    a = load_file(straight.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_sigterm_during_a_periodic_save_lets_it_finish(write_recipe, monkeypatch):
    _signal_during_writes(monkeypatch, on_calls={1}, signum=signal.SIGTERM)
    result = _train(write_recipe(training={"max_steps": 6, "save_every": 2}))
    assert result.terminated and result.steps == 2
    assert checkpoint_problem(result.run_dir / "checkpoint-000002") is None
    assert not list(result.run_dir.glob(".tmp-*"))


def test_sigterm_outside_training_keeps_the_default_handler(write_recipe):
    _train(write_recipe(training={"max_steps": 1}))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow  # a subprocess: 10-50 s on a shared machine
def test_ppft_train_exits_143_on_sigterm_with_a_resumable_checkpoint(write_recipe):
    """A scheduler's SIGTERM to `ppft train`: checkpoint of the last step, exit 143, `--resume` finishes."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    path = write_recipe(training={"max_steps": 100_000, "log_every": 1})
    run_dir = load_recipe(path).run_dir()
    cmd = [sys.executable, "-m", "cli.main", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or (run_dir / "metrics.jsonl").stat().st_size == 0:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Terminated (SIGTERM): saved" in err
    (checkpoint,) = list_checkpoints(run_dir)
    assert checkpoint_problem(checkpoint) is None
