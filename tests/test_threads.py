"""Thread counts: ``training.threads`` / ``--threads`` reach torch, and bench workers split the cores."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from preserve_core.threads import threads_per_worker


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("jobs", "total", "each"), [(1, 2, 2), (2, 2, 1), (3, 8, 2), (4, 2, 1), (2, 7, 3)])
def test_workers_share_the_threads(jobs, total, each):
    assert threads_per_worker(jobs, total) == each


def test_recipe_threads_and_cli_override_reach_torch(write_recipe, tmp_path, restore_threads):
    path = write_recipe("threads", training={"max_steps": 1, "threads": 2})
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--no-progress"]).exit_code == 0
    manifest = tmp_path / "run-threads" / "manifest.json"
    assert json.loads(manifest.read_text())["torch_threads"] == 2
    overridden = runner.invoke(app, ["train", str(path), "--no-progress", "--threads", "1", "--set", "output.overwrite=true"])
    assert overridden.exit_code == 0, overridden.output
    assert json.loads(manifest.read_text())["torch_threads"] == 1 and torch.get_num_threads() == 1
    bad = runner.invoke(app, ["train", str(path), "--set", "training.threads=0"])
    assert bad.exit_code == 2 and "training.threads" in bad.output
