"""``ppft bench``: the plan, resumability, and the results it writes."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from cli.main import app
from conftest import reverse_examples, write_jsonl

runner = CliRunner()


def bench_recipe(write_recipe, tmp_path, tiny_task_file):
    preserve = write_jsonl(tmp_path / "preserve.jsonl", reverse_examples(12, seed=5))
    path = write_recipe(
        "bench",
        training={"max_steps": 3, "batch_size": 8},
        eval={"preserve": [{"name": "keep", "kind": "exact_match", "data": str(preserve), "max_new_tokens": 6}]},
    )
    data = yaml.safe_load(path.read_text())
    data["bench"] = {
        "methods": [{"method": {"name": "full"}, "lrs": [1e-3, 1e-2]}, {"label": "lora8", "method": {"name": "lora", "r": 8}, "lrs": [1e-2]}],
        "tasks": [{"name": "rev", "train": str(tiny_task_file), "eval": str(preserve), "max_new_tokens": 6}],
        "seeds": [0],
        "kl_data": str(preserve),
        "kl_limit": 8,
        "out_dir": str(tmp_path / "bench-out"),
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_bench_runs_resumes_and_writes_results(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    result = runner.invoke(app, ["bench", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench-out"
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 3 and len(results["rows"]) == 3
    row = results["rows"][0]
    assert set(row["preserve"]) == {"keep"} and row["kl_to_base"] is not None and row["kl_to_base"] >= 0
    assert any(r["pareto"] for r in results["rows"])
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| full | 0.01 |" in (out / "results.md").read_text()

    (cell,) = (out / "cells").glob("rev__full__lr0.001__s0__*/cell.json")
    stamp = cell.stat().st_mtime_ns
    again = runner.invoke(app, ["bench", str(path), "--json"])
    assert again.exit_code == 0 and cell.stat().st_mtime_ns == stamp, "a finished cell must not be re-run"
    assert json.loads(again.stdout)["rows"] == results["rows"]  # stdout: the JSON alone

    data = yaml.safe_load(path.read_text())
    data["bench"]["methods"][0]["method"]["name"] = "lora"  # same label, other options: a new cell
    data["bench"]["methods"][0]["label"] = "full"
    path.write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["bench", str(path)]).exit_code == 0
    assert len(list((out / "cells").glob("rev__full__lr0.001__s0__*/cell.json"))) == 2


def test_bench_rejects_bad_method_before_training(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    data = yaml.safe_load(path.read_text())
    data["bench"]["methods"][0]["method"]["rnak"] = 3
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["bench", str(path)])
    assert result.exit_code == 2 and "rnak" in result.output
    assert not (tmp_path / "bench-out" / "cells").exists()
