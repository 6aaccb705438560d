"""--resume with a changed recipe: refused (exit 2, listing the keys) unless --allow-changes; then the
new optimizer settings and schedule take effect from the resumed step, and the change is recorded."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from preserve_core.recipe import load_recipe
from preserve_core.training import train

TRAINING = {"max_steps": 6, "save_every": 3, "keep_last": 2, "lr": 1e-2, "warmup_steps": 2, "schedule": "cosine"}


def _cosine(step: int, warmup: int = 2, total: int = 6) -> float:
    """transformers' cosine-with-warmup multiplier after ``step`` updates, from its definition."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _back_to_step_3(run_dir):
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoint-000006")


def test_changed_recipe_is_refused_with_the_changed_keys(write_recipe):
    path = write_recipe(training=TRAINING)
    run_dir = train(load_recipe(path), show_progress=False).run_dir
    _back_to_step_3(run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "recipe.resolved.yaml", "manifest.json")}
    args = ["train", str(path), "--resume", "--no-progress", "--set", "training.lr=1e-5", "--set", "training.save_every=1"]
    result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "training.lr: 0.01 -> 1e-05" in output and "--allow-changes" in output and "checkpoint-000003" in output
    assert "the recipe changed" in output and "training.save_every: 3 -> 1" not in output.split("the recipe changed")[1]
    assert before == {name: (run_dir / name).read_bytes() for name in before}  # nothing written


def test_allowed_change_applies_the_new_lr_from_the_resumed_step(write_recipe, monkeypatch):
    used = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    path = write_recipe(training=TRAINING)
    run_dir = train(load_recipe(path), show_progress=False).run_dir
    _back_to_step_3(run_dir)
    train(load_recipe(path, ["training.lr=1e-3"]), resume=True, show_progress=False, allow_changes=True)
    # update k (1-based) uses lr * multiplier(k - 1); the first run made updates 1..6 at the old lr,
    # the resumed one redoes 4..6 at the new lr
    assert used[:6] == pytest.approx([1e-2 * _cosine(k) for k in range(6)], rel=1e-12)
    assert used[6:] == pytest.approx([1e-3 * _cosine(k) for k in range(3, 6)], rel=1e-12)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    event = next(line for line in lines if line.get("event") == "resume")
    assert event["step"] == 3 and event["recipe_changes"] == {"training.lr": [0.01, 0.001]}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed"]["recipe_changes"] == {"training.lr": [0.01, 0.001]}
