"""``ppft compare``: evaluated runs side by side, with the learning-vs-forgetting plot."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app
from tests.conftest import reverse_examples, write_jsonl


def train_and_eval(runner, write_recipe, name: str, method: dict, eval_section: dict):
    path = write_recipe(name, method=method, eval=eval_section)
    assert runner.invoke(app, ["train", str(path), "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    return path.parent / f"run-{name}"


def test_compare_tabulates_runs_and_plots(write_recipe, tmp_path, tiny_task_file):
    runner = CliRunner()
    held_out = write_jsonl(tmp_path / "held.jsonl", reverse_examples(16, seed=7))
    eval_section = {
        "batch_size": 8,
        "target": [{"name": "rev", "kind": "exact_match", "data": str(held_out), "max_new_tokens": 8}],
        "preserve": [{"name": "keep", "kind": "exact_match", "data": str(tiny_task_file), "max_new_tokens": 8, "limit": 16}],
    }
    runs = [
        train_and_eval(runner, write_recipe, "a", {"name": "full"}, eval_section),
        train_and_eval(runner, write_recipe, "b", {"name": "lora", "r": 4, "alpha": 8}, eval_section),
    ]
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["full", "lora"]
    for row, run in zip(data["rows"], runs, strict=True):
        report = json.loads((run / "eval" / "report.json").read_text())
        tuned = {t["name"]: t["tuned"] for t in report["tasks"]}
        assert row["new_task"]["score"] == tuned["rev"] and row["preserve_mean"]["score"] == tuned["keep"]
    assert any(r["pareto"] for r in data["rows"])
    assert (out / "learning_vs_forgetting.png").stat().st_size > 1000
    assert "| full |" in (out / "comparison.md").read_text()


def test_compare_refuses_a_run_without_a_report(tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "ppft eval" in result.output
