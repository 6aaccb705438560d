"""Recipes: strictness, locations in errors, extends, --set, paths; CLI exit codes; every shipped recipe validates."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from preserve_core.errors import RecipeError
from preserve_core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_unknown_key_names_path_line_and_suggestion(write_recipe):
    path = write_recipe(training={"lrr": 0.1})
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "training.lrr" in result.output and "Did you mean 'lr'" in result.output
    assert f"{path}:" in result.output.replace("\n", "")


def test_method_option_typo_gets_suggestion(write_recipe):
    result = cli("validate", write_recipe(method={"name": "lora", "alhpa": 4}))
    assert result.exit_code == 2 and "method.alhpa" in result.output and "'alpha'" in result.output


def test_unknown_method_suggests(write_recipe):
    result = cli("validate", write_recipe(method={"name": "lorra"}))
    assert result.exit_code == 2 and "Did you mean 'lora'" in result.output


def test_wrong_type_is_named(write_recipe):
    result = cli("train", write_recipe(training={"max_steps": "many"}))
    assert result.exit_code == 2 and "training.max_steps" in result.output


def test_missing_file_is_named(write_recipe, tmp_path):
    result = cli("train", write_recipe(data={"train": str(tmp_path / "nope.jsonl")}))
    assert result.exit_code == 2 and "data.train" in result.output and "not found" in result.output


@pytest.mark.parametrize(
    "override, expect",
    [("training.lr", "key.path=value"), ("training.lr=abc", "training.lr"), ("training.bogus=1", "training.bogus")],
)
def test_bad_set_exits_2(write_recipe, override, expect):
    result = cli("train", write_recipe(), "--set", override)
    assert result.exit_code == 2 and expect in result.output


def test_set_overrides_are_validated_and_applied(write_recipe):
    recipe = load_recipe(write_recipe(), ["training.lr=3e-4", "method.r=16"])
    assert recipe.training.lr == 3e-4 and recipe.method.r == 16


def test_extends_and_relative_paths(tmp_path, tiny_task_file):
    (tmp_path / "sub").mkdir()
    data = tmp_path / "sub" / "task.jsonl"
    data.write_text(tiny_task_file.read_text())
    (tmp_path / "sub" / "base.yaml").write_text(
        yaml.safe_dump({"data": {"train": "task.jsonl"}, "method": {"name": "lora", "r": 4}, "training": {"lr": 0.5}})
    )
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "sub/base.yaml", "method": {"name": "lora", "r": 2}}))
    recipe = load_recipe(tmp_path / "child.yaml")
    assert recipe.data.train == str(data)
    assert recipe.method.r == 2 and recipe.method.alpha == 16 and recipe.training.lr == 0.5
    assert recipe.name == "child"


FORA_METHOD = {"name": "fora", "form": "lora", "r": 8, "alpha": 16, "energy": 0.9, "spectral_size": 2}


@pytest.mark.parametrize("order", ["set_before", "set_after"])
def test_set_method_name_replaces_the_block_keeping_same_command_options(write_recipe, order):
    """--set method.name=lora on a FORA recipe: FORA's form/energy/spectral_size go, --set method.r stays."""
    sets = ["method.r=3", "method.name=lora"] if order == "set_before" else ["method.name=lora", "method.r=3"]
    recipe = load_recipe(write_recipe(method=FORA_METHOD), sets)
    assert recipe.method.model_dump() == {"name": "lora", "r": 3, "alpha": 16.0, "dropout": 0.0, "use_rslora": False, "regularizers": []}


def test_set_method_name_same_method_keeps_file_options(write_recipe):
    recipe = load_recipe(write_recipe(method=FORA_METHOD), ["method.name=fora", "method.r=4"])
    assert (recipe.method.r, recipe.method.energy, recipe.method.spectral_size) == (4, 0.9, 2)


def test_set_method_name_option_of_old_method_names_the_set(write_recipe):
    result = cli("validate", write_recipe(method=FORA_METHOD), "--set", "method.name=full", "--set", "method.energy=0.5")
    assert result.exit_code == 2
    out = result.output.replace("\n", "")
    assert "--set method.energy=0.5: method.energy: unknown key" in out and "form" not in out


def test_shipped_real_model_recipe_switches_method_from_command_line():
    """The exact command of issue 15: it failed with `method.form: unknown key`."""
    result = cli("validate", REPO / "recipes" / "qwen3_1.7b_fora.yaml", "--set", "method.name=full")
    assert result.exit_code == 0, result.output
    recipe = load_recipe(REPO / "recipes" / "qwen3_1.7b_fora.yaml", ["method.name=full"], output_dir="unused")
    assert recipe.method.model_dump() == {"name": "full", "regularizers": []}


def _base_and_child(tmp_path, tiny_task_file, base_method, child_method):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"data": {"train": str(tiny_task_file)}, "training": {"lr": 0.5}, "method": base_method}, sort_keys=False)
    )
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "method": child_method}, sort_keys=False))
    return tmp_path / "child.yaml"


def test_extends_with_another_method_replaces_the_block(tmp_path, tiny_task_file):
    child = _base_and_child(tmp_path, tiny_task_file, FORA_METHOD, {"name": "lora", "r": 2})
    recipe = load_recipe(child)
    assert recipe.method.model_dump() == {"name": "lora", "r": 2, "alpha": 16.0, "dropout": 0.0, "use_rslora": False, "regularizers": []}
    assert recipe.training.lr == 0.5


def test_extends_error_names_the_file_holding_the_line(tmp_path, tiny_task_file):
    """Same method in both files: options merge, and a bad option in the base is reported at the base's line."""
    child = _base_and_child(tmp_path, tiny_task_file, {**FORA_METHOD, "enrgy": 0.1}, {"name": "fora", "r": 2})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    base_line = 1 + (tmp_path / "base.yaml").read_text().splitlines().index("  enrgy: 0.1")
    assert f"{tmp_path / 'base.yaml'}:{base_line}: method.enrgy: unknown key" in str(err.value)
    child = _base_and_child(tmp_path, tiny_task_file, FORA_METHOD, {"name": "full", "r": 2})
    with pytest.raises(RecipeError, match=f"{tmp_path / 'child.yaml'}:4: method.r: unknown key"):
        load_recipe(child)


def test_extends_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_not_a_mapping(tmp_path):
    (tmp_path / "r.yaml").write_text("- 1\n- 2\n")
    assert cli("validate", tmp_path / "r.yaml").exit_code == 2


def test_over_long_examples_error_unless_truncation(write_recipe):
    result = cli("train", write_recipe(data={"max_length": 4}))
    assert result.exit_code == 2 and "data.max_length" in result.output
    result = cli("train", write_recipe("cut", data={"max_length": 6, "truncation": "left"}, training={"max_steps": 1}))
    assert result.exit_code == 0, result.output


def test_help_is_complete():
    for command in ([], ["train"], ["validate"]):
        result = cli(*command, "--help")
        assert result.exit_code == 0
    assert "--resume" in cli("train", "--help").output


@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe_file, tmp_path):
    load_recipe(recipe_file, output_dir=str(tmp_path / "run"))


TWO_PROCESS_METHODS = [
    ({"name": "lora", "r": 4, "alpha": 8}, "adapter_model.safetensors"),
    ({"name": "fora", "r": 4, "alpha": 8, "spectral_size": 2}, "adapter_model.safetensors"),
    ({"name": "fora", "form": "full"}, "model.safetensors"),
    ({"name": "folora", "r": 4, "alpha": 8, "refresh_every": 2, "refresh_window": 1}, "adapter_model.safetensors"),
    ({"name": "kl", "strength": 1.0}, "model.safetensors"),
    ({"name": "ewc", "strength": 1.0}, "model.safetensors"),
    ({"name": "replay", "rho": 0.25}, "model.safetensors"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "weights"), TWO_PROCESS_METHODS, ids=lambda v: v["name"] + v.get("form", "") if isinstance(v, dict) else "")
def test_two_process_run(write_recipe, tmp_path, method, weights):
    """2 CPU processes through Accelerate (DDP over gloo), calibration sharded too; only rank 0 writes files."""
    calibration = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 8, "max_task_examples": 16, "fisher_samples": 8}
    path = write_recipe(training={"max_steps": 4, "batch_size": 4}, method=method, calibration=calibration)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cli.main", "train", str(path),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = load_recipe(path).run_dir()
    manifest = yaml.safe_load((run_dir / "manifest.json").read_text())
    assert manifest["num_processes"] == 2
    assert (run_dir / "final" / weights).exists()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4], "metrics once (rank 0), not once per process"
    assert all(math.isfinite(m["loss"]) for m in lines if "loss" in m)


def test_recipe_reference_is_current():
    from preserve_core.recipe_docs import render

    assert (REPO / "docs" / "recipes.md").read_text() == render(), "run: python -m preserve_core.recipe_docs > docs/recipes.md"
