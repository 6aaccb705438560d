"""FSDP (training.distributed.strategy: fsdp): 2 CPU processes over gloo against one process.

The equivalence tests use examples of one length, so the mean loss of two ranks' half-batches equals
the mean over the whole batch, and one process with ``grad_accum: 2`` sees exactly the examples the
two ranks see together (rank r takes every 2nd example of the epoch's permutation): the final weights
must then agree up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from preserve_core.errors import RecipeError
from preserve_core.recipe import load_recipe
from preserve_core.sharding import fsdp_settings
from preserve_core.training import train

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 8, "max_task_examples": 16, "fisher_samples": 8}


@pytest.fixture(scope="module")
def same_length_task(tmp_path_factory) -> Path:
    """64 reversal examples whose words all have 4 letters (every example is 10 + 4 + eos tokens)."""
    g = torch.Generator().manual_seed(1)
    words = ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (4,), generator=g)) for _ in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("same") / "task.jsonl", [{"prompt": f"rev:{w}=", "completion": w[::-1]} for w in words])


def torchrun(path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cli.main", "train", str(path),
           "--no-progress", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def accelerate_fsdp_env(config: Path = REPO / "recipes" / "accelerate" / "fsdp_8gpu.yaml") -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file config` gives each process (Accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "cli.main", "train", "recipe.yaml"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if "FSDP" in k}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "final"
    name = "model.safetensors" if (folder / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(folder / name)


EQUIVALENT = [
    ({"name": "full"}, {}),
    ({"name": "fora", "form": "full", "u_rank": 4, "spectral_size": 2, "energy": 0.9}, {"weight_decay": 0.1}),
    ({"name": "l2sp", "strength": 5.0}, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "extra"), EQUIVALENT, ids=lambda v: v.get("name", "") + v.get("form", "") if v else "")
def test_fsdp_final_weights_equal_one_process(write_recipe, same_length_task, tmp_path, method, extra):
    """Projected AdamW on row shards (with U_1^T X reduced across ranks), clipping by the global norm,
    a penalty summed over shards: all must give the one-process weights."""
    common = {"max_steps": 3, "lr": 1e-2, "schedule": "constant", "max_grad_norm": 0.5, **extra}
    calibration = {**CALIBRATION, "dir": str(tmp_path / "calibration")}  # computed once, shared by both runs
    data = {"train": str(same_length_task)}
    one = write_recipe("one", method=method, data=data, calibration=calibration,
                       training={**common, "batch_size": 4, "grad_accum": 2})  # fmt: skip
    reference = train(load_recipe(one), show_progress=False)
    two = write_recipe("two", method=method, data=data, calibration=calibration,
                       training={**common, "batch_size": 4, "distributed": {"strategy": "fsdp"}})  # fmt: skip
    proc = torchrun(two)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = load_recipe(two).run_dir()
    assert json.loads((run_dir / "manifest.json").read_text())["distributed"] == "fsdp"
    expected, got = final_weights(reference.run_dir), final_weights(run_dir)
    assert expected.keys() == got.keys()
    moved = max(float((expected[k] - load_file(_base(write_recipe))[k]).abs().max()) for k in expected if "proj" in k)
    assert moved > 1e-2  # 3 Adam steps of lr 1e-2 moved the weights: agreement is not trivial
    for key in expected:  # Adam turns float32 noise in near-zero gradients into up to ~2e-5 (DDP does the same)
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=key)


def _base(write_recipe) -> Path:
    return Path(load_recipe(write_recipe("base")).model.name_or_path) / "model.safetensors"


OTHERS = [
    {"name": "lora", "r": 4, "alpha": 8},
    {"name": "fora", "r": 4, "alpha": 8, "spectral_size": 2},
    {"name": "folora", "r": 4, "alpha": 8, "refresh_every": 2, "refresh_window": 1},
    {"name": "kl", "strength": 1.0, "reference": "cached"},
    {"name": "kl", "strength": 1.0, "form": "lora", "r": 4},
    {"name": "ewc", "strength": 1.0},
    {"name": "replay", "rho": 0.25},
    {"name": "pissa", "r": 4},
    {"name": "milora", "r": 4},
    {"name": "corda_kpm", "r": 4},
]


@pytest.mark.slow
@pytest.mark.parametrize("method", OTHERS, ids=lambda v: v["name"] + v.get("form", ""))
def test_fsdp_methods_train_and_export(write_recipe, tmp_path, method):
    """Every supported method trains sharded, checkpoints mid-run and exports what one process exports.
    LoRA is sharded the way `accelerate launch --config_file <FSDP2 config>` asks (its environment variables)."""
    training = {"max_steps": 4, "batch_size": 4, "save_every": 2, "keep_last": 3, "distributed": {"strategy": "fsdp"}}
    env = None
    if method["name"] == "lora":
        training["distributed"] = {"strategy": "auto"}
        env = accelerate_fsdp_env()
    path = write_recipe(training=training, method=method, calibration=CALIBRATION)
    proc = torchrun(path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = load_recipe(path).run_dir()
    weights = final_weights(run_dir)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    trainable = load_file(run_dir / "checkpoint-000004" / "trainable.safetensors")
    state = torch.load(run_dir / "checkpoint-000004" / "state.pt", weights_only=True)["optimizer"]["state"]
    shapes = sorted(tuple(t.shape) for t in trainable.values())
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == shapes  # full, not per-rank, moments
    assert json.loads((run_dir / "manifest.json").read_text())["distributed"] == "fsdp"


@pytest.mark.slow
def test_fsdp_bf16_weights_train_on_fp32_masters(write_recipe):
    """bf16 weights: FORA's trained W (bf16) and its channel delta (fp32) cannot share an FSDP unit as they
    are; sharded, every trainable parameter becomes a float32 master (gathered in bf16 for compute)."""
    method = {"name": "fora", "form": "full", "spectral_size": 2}
    training = {"max_steps": 2, "batch_size": 4, "distributed": {"strategy": "fsdp"}}
    path = write_recipe(method=method, training=training, model={"dtype": "bfloat16"}, calibration=CALIBRATION)
    proc = torchrun(path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    weights = final_weights(load_recipe(path).run_dir())
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert weights["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16  # frozen: as loaded


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(write_recipe, same_length_task, tmp_path):
    """4 steps in one process = 4 steps under FSDP = resumed under FSDP from its step-2 checkpoint."""
    method = {"name": "fora", "form": "full", "u_rank": 4, "spectral_size": 0, "energy": 0.9}
    common = {"lr": 1e-2, "schedule": "constant", "batch_size": 4, "max_steps": 4}
    calibration = {**CALIBRATION, "dir": str(tmp_path / "calibration")}
    data = {"train": str(same_length_task)}
    one = write_recipe("one", method=method, data=data, calibration=calibration, training={**common, "grad_accum": 2})
    expected = final_weights(train(load_recipe(one), show_progress=False).run_dir)
    two = write_recipe("two", method=method, data=data, calibration=calibration,
                       training={**common, "save_every": 2, "keep_last": 3, "distributed": {"strategy": "fsdp"}})  # fmt: skip
    run_dir = load_recipe(two).run_dir()
    assert torchrun(two).returncode == 0
    straight = final_weights(run_dir)
    shutil.rmtree(run_dir / "checkpoint-000004")
    shutil.rmtree(run_dir / "final")
    proc = torchrun(two, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    resumed = final_weights(run_dir)
    for key in expected:
        torch.testing.assert_close(straight[key], expected[key], rtol=0, atol=1e-4, msg=key)
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# refusals (fast)
# ---------------------------------------------------------------------------------------------
def test_shipped_accelerate_config_selects_fsdp2(write_recipe, monkeypatch):
    for key, value in accelerate_fsdp_env().items():
        monkeypatch.setenv(key, value)
    settings = fsdp_settings(load_recipe(write_recipe()))
    assert settings is not None and settings.reshard_after_forward and "accelerate config" in settings.source


def test_accelerate_fsdp1_config_is_refused(write_recipe, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RecipeError, match="fsdp_version: 2"):
        fsdp_settings(load_recipe(write_recipe()))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_settings(load_recipe(write_recipe())).reshard_after_forward is False
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(RecipeError, match="model.gradient_checkpointing"):
        fsdp_settings(load_recipe(write_recipe()))
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    with pytest.raises(RecipeError, match="strategy is ddp"):
        fsdp_settings(load_recipe(write_recipe(training={"distributed": {"strategy": "ddp"}})))


@pytest.mark.parametrize(
    ("method", "retention", "expect"),
    [
        ({"name": "lora", "r": 4}, True, "eval.every_n_steps"),
        ({"name": "kl", "reference": "frozen"}, False, "reference: cached"),
        ({"name": "fora", "regularizers": [{"name": "l2sp"}]}, False, "method.regularizers"),
        ({"name": "fora", "form": "full", "refresh_every": 2}, False, "refresh_every"),
    ],
)
def test_unsupported_fsdp_combinations_exit_2(write_recipe, tiny_task_file, method, retention, expect):
    from typer.testing import CliRunner

    from cli.main import app

    sections = {"training": {"distributed": {"strategy": "fsdp"}}}
    if retention:
        task = {"name": "rev", "kind": "exact_match", "data": str(tiny_task_file)}
        sections["eval"] = {"every_n_steps": 2, "preserve": [task]}
    result = CliRunner().invoke(app, ["train", str(write_recipe(method=method, **sections))])
    assert result.exit_code == 2, result.output
    assert expect in result.output.replace("\n", "")
