"""One matrix over every registered method (and each of its forms): train through the engine, resume
exactly from a checkpoint, and export something stock transformers / PEFT loads with ppft's logits.

Adding a method to the registry without a row here fails ``test_matrix_covers_every_method``.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rewind_to_previous_checkpoint
from safetensors.torch import load_file

from preserve_core.methods import METHODS
from preserve_core.recipe import load_recipe
from preserve_core.training import train

CALIBRATION = {"num_samples": 12, "max_new_tokens": 12, "batch_size": 12, "stats_batch_size": 8, "fisher_samples": 8}
IDS = torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41]])
MATRIX = [
    {"name": "full"},
    {"name": "lora", "r": 2, "alpha": 4},
    {"name": "fora", "form": "lora", "r": 2, "alpha": 4, "u_rank": 2, "spectral_size": 2},
    {"name": "fora", "form": "lora", "r": 2, "alpha": 4, "residual_shrink": 100.0},
    {"name": "fora", "form": "lora", "r": 2, "alpha": 4, "residual_shrink": 100.0, "init": "gradient", "init_rows": 8},
    {"name": "fora", "form": "full", "residual_shrink": 100.0},
    {"name": "folora", "r": 2, "alpha": 4, "step": "shrink"},
    {"name": "folora", "r": 2, "alpha": 4, "step": "shrink", "gate": "hard", "init": "gradient", "init_rows": 8},
    {"name": "folora", "r": 2, "alpha": 4, "refresh_every": 2, "refresh_preserve": True, "refresh_samples": 4},
    {"name": "folora", "r": 2, "alpha": 4, "task_shrinkage": 0.5, "step": "euclidean", "gate": "hard"},
    {"name": "fora", "form": "full", "u_rank": 2},
    {"name": "fora", "form": "full", "regularizers": [{"name": "kl", "strength": 1.0}]},
    {"name": "fora", "form": "lora", "r": 2, "alpha": 4, "regularizers": [{"name": "leak", "strength": 1000.0}]},
    {"name": "folora", "r": 2, "alpha": 4, "regularizers": [{"name": "leak", "strength": 1000.0}]},
    {"name": "lora", "r": 2, "alpha": 4, "regularizers": [{"name": "leak"}]},
    {"name": "fora", "form": "full", "export_adapter": True, "energy": 0.9, "u_rank": 2, "spectral_size": 2},
    {"name": "weightproj", "form": "lora", "r": 2, "alpha": 4},
    {"name": "weightproj", "form": "full"},
    {"name": "folora", "r": 2, "alpha": 4},
    {"name": "replay", "form": "full", "rho": 0.3},
    {"name": "replay", "form": "lora", "r": 2, "alpha": 4, "rho": 0.3},
    {"name": "l2sp", "form": "full", "strength": 0.1},
    {"name": "l2sp", "form": "lora", "r": 2, "alpha": 4, "strength": 0.1},
    {"name": "ewc", "form": "lora", "r": 2, "alpha": 4},
    {"name": "ewc", "form": "full"},
    {"name": "kl", "form": "lora", "r": 2, "alpha": 4},
    {"name": "kl", "form": "full", "preserve_batch_size": 4},
    {"name": "pissa", "r": 2, "alpha": 4},
    {"name": "milora", "r": 2, "alpha": 4},
    {"name": "corda_kpm", "r": 2, "alpha": 4},
]


def label(method: dict) -> str:
    extra = "+" + "+".join(r["name"] for r in method["regularizers"]) if "regularizers" in method else ""
    return method["name"] + (f"-{method['form']}" if "form" in method else "") + extra


def test_matrix_covers_every_method():
    assert {m["name"] for m in MATRIX} == set(METHODS)
    forms = {(m["name"], m.get("form")) for m in MATRIX}
    for name, cls in METHODS.items():
        field = cls.Options.model_fields.get("form")
        if field is not None:
            assert {(name, f) for f in ("lora", "full")} <= forms, f"{name}: both forms belong in the matrix"


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix-calibration")


def final_tensors(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def load_export(run_dir, base_path):
    """The export, loaded the way a user would: a PEFT adapter on the base, else a whole model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = run_dir / "final"
    if (final / "adapter_config.json").exists():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final).eval()
    return AutoModelForCausalLM.from_pretrained(final).eval()


@pytest.mark.parametrize("method", MATRIX, ids=label)
def test_method_trains_resumes_exactly_and_exports(method, write_recipe, calibration_dir):
    sections = {"method": method, "calibration": {**CALIBRATION, "dir": str(calibration_dir)},
                "training": {"max_steps": 4, "save_every": 2, "keep_last": 5, "lr": 1e-2, "weight_decay_timescale": 4.0}}  # fmt: skip
    straight = train(load_recipe(write_recipe("straight", **sections)), show_progress=False)
    losses = [m["loss"] for m in straight.metrics if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    manifest = json.loads((straight.run_dir / "manifest.json").read_text())
    assert manifest["weight_decay"] == pytest.approx(6.25), "every optimizer: 1 / (lr 1e-2 * 4.0 * 4 steps)"

    path = write_recipe("resumed", **sections)
    first = train(load_recipe(path), show_progress=False)
    rewind_to_previous_checkpoint(first.run_dir)  # resume from step 2, not from the end
    resumed = train(load_recipe(path), resume=True, show_progress=False)
    a, b = final_tensors(straight.run_dir), final_tensors(resumed.run_dir)
    assert a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)

    from transformers import AutoModelForCausalLM

    base_path = load_recipe(path).model.name_or_path
    exported = load_export(straight.run_dir, base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    straight.model.eval()
    with torch.no_grad():
        ours = straight.model(input_ids=IDS).logits
        torch.testing.assert_close(exported(input_ids=IDS).logits, ours, atol=1e-5, rtol=1e-5)
        assert (ours - base(input_ids=IDS).logits).abs().max() > 1e-4, "training changed nothing the export shows"
