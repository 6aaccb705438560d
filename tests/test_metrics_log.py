"""metrics.jsonl holds every training step exactly once: a fresh or overwriting run starts a new log,
a resumed one drops what was logged after its checkpoint (a line cut short by a crash included)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preserve_core.errors import TrainingDiverged
from preserve_core.methods.lora import Lora
from preserve_core.recipe import load_recipe
from preserve_core.training import train


def _loss_steps(run_dir) -> list[int]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


def test_overwrite_rerun_starts_a_new_log(write_recipe):
    path = write_recipe(training={"max_steps": 3})
    run_dir = train(load_recipe(path), show_progress=False).run_dir
    train(load_recipe(path, ["output.overwrite=true"]), show_progress=False)
    assert _loss_steps(run_dir) == [1, 2, 3]


def test_rerun_after_a_failure_before_any_checkpoint_starts_a_new_log(write_recipe, monkeypatch):
    calls = {"n": 0}

    def nan_at_third(self, model, batch, outputs):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 3 else None

    monkeypatch.setattr(Lora, "extra_loss", nan_at_third)
    path = write_recipe(training={"max_steps": 4})
    with pytest.raises(TrainingDiverged):
        train(load_recipe(path), show_progress=False)
    run_dir = load_recipe(path).run_dir()
    assert _loss_steps(run_dir) == [1, 2]
    train(load_recipe(path), show_progress=False)  # no checkpoint, no final: a plain rerun is allowed
    assert _loss_steps(run_dir) == [1, 2, 3, 4]


def test_resume_drops_later_lines_and_a_torn_last_line(write_recipe):
    path = write_recipe(training={"max_steps": 6, "save_every": 3})
    run_dir = train(load_recipe(path), show_progress=False).run_dir
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoint-000006")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # killed mid-write
    train(load_recipe(path), resume=True, show_progress=False)
    assert _loss_steps(run_dir) == [1, 2, 3, 4, 5, 6]
