"""``ppft bench``: the plan, resumability, and the results it writes."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from preserve_core.bench import task_eval_data
from preserve_core.recipe_schema import BenchTask
from conftest import reverse_examples, write_jsonl

runner = CliRunner()


def bench_recipe(write_recipe, tmp_path, tiny_task_file):
    preserve = write_jsonl(tmp_path / "preserve.jsonl", reverse_examples(12, seed=5))
    other = write_jsonl(tmp_path / "other_task.jsonl", reverse_examples(8, seed=9))
    path = write_recipe(
        "bench",
        data={"eval": str(other)},  # the base recipe's eval data: cells must not inherit it
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
    assert sorted(p.name for p in cell.parent.iterdir()) == ["cell.json", "manifest.json", "metrics.jsonl", "recipe.resolved.yaml"]
    cell_data = yaml.safe_load((cell.parent / "recipe.resolved.yaml").read_text())["data"]
    assert cell_data["eval"] == str(tmp_path / "preserve.jsonl"), "the cell's own task, not the base recipe's"
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


def test_cell_eval_data_is_the_tasks_held_out_split():
    assert task_eval_data(BenchTask(name="s", train="lab:shift", eval="lab:shift")) == "lab:shift@eval"
    assert task_eval_data(BenchTask(name="s", train="lab:shift", eval="lab:shift@eval")) == "lab:shift@eval"
    assert task_eval_data(BenchTask(name="s", train="a.jsonl", eval="/d/b.jsonl")) == "/d/b.jsonl"


def test_an_interrupted_cell_is_not_scored_and_reruns(write_recipe, tmp_path, tiny_task_file, monkeypatch):
    import preserve_core.training as training

    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    real_train = training.train

    def interrupted(recipe, **kwargs):
        result = real_train(recipe.model_copy(update={"training": recipe.training.model_copy(update={"max_steps": 1})}), **kwargs)
        result.interrupted = True
        return result

    monkeypatch.setattr(training, "train", interrupted)
    result = runner.invoke(app, ["bench", str(path), "--only", "lora8"])
    assert result.exit_code == 130
    assert not list((tmp_path / "bench-out" / "cells").glob("*/cell.json"))
    monkeypatch.setattr(training, "train", real_train)
    assert runner.invoke(app, ["bench", str(path), "--only", "lora8"]).exit_code == 0
    (cell,) = (tmp_path / "bench-out" / "cells").glob("rev__lora8__*/cell.json")
    steps = [json.loads(line)["step"] for line in (cell.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], "the rerun starts clean: no lines of the interrupted attempt"


def scores_by_id(folder):
    return {p.parent.name: json.load(open(p)) for p in (folder / "cells").glob("*/cell.json")}


def test_parallel_cells_equal_sequential_ones_and_partial_runs_merge(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    out = tmp_path / "bench-out"
    parallel = runner.invoke(app, ["bench", str(path), "--only", "full", "--jobs", "2", "--threads", "2"])
    assert parallel.exit_code == 0, parallel.output
    said = " ".join(parallel.output.split())
    assert "from 2 of 3 planned cells (2 run now, 0 finished before" in said and "1 not run yet" in said
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
    manifest = json.loads(next((out / "cells").glob("rev__full__*/manifest.json")).read_text())
    assert manifest["torch_threads"] == 1, "--threads 2 over --jobs 2: one thread per worker"

    merged = runner.invoke(app, ["bench", str(path), "--only", "lora8"])
    assert merged.exit_code == 0, merged.output
    assert "from 3 of 3 planned cells (1 run now, 2 finished before, 0 kept" in " ".join(merged.output.split())
    table = (out / "results.md").read_text()
    assert "| full | 0.01 |" in table and "| full | 0.001 |" in table and "| lora8 | 0.01 |" in table
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3

    sequential = runner.invoke(app, ["bench", str(path), "--only", "full", "--threads", "1", "--set", f"bench.out_dir={tmp_path / 'seq'}"])
    assert sequential.exit_code == 0, sequential.output
    seq, par = scores_by_id(tmp_path / "seq"), scores_by_id(out)
    assert len(seq) == 2 and all(seq[i]["scores"] == par[i]["scores"] and seq[i]["final_loss"] == par[i]["final_loss"] for i in seq)

    for cell in (out / "cells").glob("rev__full__*"):  # cell folders gone (a fresh clone): results.json keeps them
        shutil.rmtree(cell)
    kept = runner.invoke(app, ["bench", str(path), "--only", "lora8"])
    assert "(0 run now, 1 finished before, 2 kept from the previous results.json)" in " ".join(kept.output.split())
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 3


def test_only_with_an_unknown_label_is_bad_input(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    result = runner.invoke(app, ["bench", str(path), "--only", "lora"])
    assert result.exit_code == 2 and "lora8" in result.output


def test_a_rows_own_training_settings_reach_its_cells_and_their_ids(write_recipe, tmp_path, tiny_task_file):
    import hashlib

    from preserve_core.bench import cell_recipe, plan_cells
    from preserve_core.recipe import load_recipe

    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    data = yaml.safe_load(path.read_text())
    data["bench"]["methods"].append({"label": "lora8_wd", "method": {"name": "lora", "r": 8}, "lrs": [1e-2], "training": {"weight_decay": 0.5}})
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    cells = {c.label: c for c in plan_cells(recipe) if c.lr == 1e-2}
    # without a row's own settings a cell keeps the id it always had: the method's JSON alone
    assert cells["lora8"].id == "rev__lora8__lr0.01__s0__" + hashlib.sha256(b'{"name": "lora", "r": 8}').hexdigest()[:6]
    same_method = hashlib.sha256(b'{"name": "lora", "r": 8} {"weight_decay": 0.5}').hexdigest()[:6]
    assert cells["lora8_wd"].id == f"rev__lora8_wd__lr0.01__s0__{same_method}"
    task = recipe.bench.tasks[0]
    tuned = cell_recipe(recipe, cells["lora8_wd"], task, tmp_path / "cells")
    plain = cell_recipe(recipe, cells["lora8"], task, tmp_path / "cells")
    assert (tuned.training.weight_decay, tuned.training.lr, tuned.training.max_steps) == (0.5, 1e-2, 3)
    assert plain.training.weight_decay == recipe.training.weight_decay == 0.0


def test_a_rows_training_settings_are_checked_before_training(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    for training, expected in [({"lr": 1e-3}, "lrs and bench.seeds set them"), ({"wieght_decay": 1.0}, "Did you mean 'weight_decay'")]:
        data = yaml.safe_load(path.read_text())
        data["bench"]["methods"][0]["training"] = training
        path.write_text(yaml.safe_dump(data))
        result = runner.invoke(app, ["bench", str(path)])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "bench-out" / "cells").exists()


def test_a_row_with_its_own_training_settings_trains_and_reports_them(write_recipe, tmp_path, tiny_task_file):
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    data = yaml.safe_load(path.read_text())
    data["bench"]["methods"][1]["training"] = {"weight_decay": 0.5, "max_steps": 2}
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["bench", str(path), "--only", "lora8"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench-out"
    (cell,) = (out / "cells").glob("rev__lora8__*/cell.json")
    assert json.loads(cell.read_text())["training"] == {"weight_decay": 0.5, "max_steps": 2}
    trained = yaml.safe_load((cell.parent / "recipe.resolved.yaml").read_text())["training"]
    assert (trained["weight_decay"], trained["max_steps"], trained["lr"]) == (0.5, 2, 1e-2)
    steps = [json.loads(line)["step"] for line in (cell.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2], "the row's max_steps, not the recipe's 3"
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["row_training"] == {"lora8": {"weight_decay": 0.5, "max_steps": 2}} and settings["steps"] == 3


def test_a_rows_weight_decay_timescale_follows_each_swept_rate(write_recipe, tmp_path, tiny_task_file):
    """weight_decay_timescale 4 over 3 steps: decay 1 / (lr * 4 * 3), by hand 83.33 at 1e-3 and 8.333 at 1e-2,
    the same per-step pull lr * decay = 1/12 at both rates; the optimizer applies it (each cell's manifest)."""
    path = bench_recipe(write_recipe, tmp_path, tiny_task_file)
    data = yaml.safe_load(path.read_text())
    data["bench"]["methods"][0]["training"] = {"weight_decay_timescale": 4.0}
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["bench", str(path), "--only", "full"])
    assert result.exit_code == 0, result.output
    decays = {}
    for manifest in (tmp_path / "bench-out" / "cells").glob("rev__full__*/manifest.json"):
        lr = yaml.safe_load((manifest.parent / "recipe.resolved.yaml").read_text())["training"]["lr"]
        decays[lr] = json.loads(manifest.read_text())["weight_decay"]
    assert decays == {1e-3: pytest.approx(1000 / 12), 1e-2: pytest.approx(100 / 12)}


def test_weight_decay_and_its_timescale_together_are_refused(write_recipe, tmp_path):
    path = write_recipe("both", training={"weight_decay": 1.0, "weight_decay_timescale": 0.125})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "weight_decay (1.0) and weight_decay_timescale (0.125) are both set" in result.output
