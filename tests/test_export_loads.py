"""Exports load in one line with stock transformers / PEFT, wherever the shell is, and match ppft's model.

The base is the ``lab:micro`` model (built in seconds in a temporary ``$PPFT_HOME`` given as a
*relative* path, so a recorded path only loads if it was made absolute).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from preserve_core.recipe import load_recipe
from preserve_core.training import train

IDS = torch.tensor([[1, 21, 8, 25, 33, 4, 5, 26, 9, 40]])  # lab vocabulary: 43 tokens
CALIBRATION = {"preserve_source": "sample", "num_samples": 16, "max_new_tokens": 12, "stats_batch_size": 16,
               "max_task_examples": 16}  # fmt: skip
METHODS = [
    {"name": "lora", "r": 2, "alpha": 4},
    {"name": "pissa", "r": 2, "alpha": 4},
    {"name": "fora", "form": "lora", "r": 2, "alpha": 4, "u_rank": 2, "spectral_size": 2},
    {"name": "folora", "r": 2, "alpha": 4},
    {"name": "full"},
]


@pytest.fixture(scope="module")
def lab_recipe(tmp_path_factory):
    """``recipe(method) -> Path`` on ``lab:micro`` / ``lab:reverse``; PPFT_HOME is relative to the cwd."""
    root = tmp_path_factory.mktemp("export-loads")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("PPFT_HOME", "home")

    def write(method: dict) -> tuple:
        recipe = {
            "model": {"name_or_path": "lab:micro"},
            "data": {"train": "lab:reverse", "max_length": 32},
            "method": method,
            "training": {"lr": 1e-2, "max_steps": 3, "batch_size": 8, "seed": 0},
            "calibration": {**CALIBRATION, "dir": str(root / "calibration")},
            "output": {"dir": str(root / f"run-{method['name']}")},
        }
        path = root / f"{method['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path, root

    yield write
    mp.undo()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_one_line_load_matches_ppft(lab_recipe, method, monkeypatch, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    path, root = lab_recipe(method)
    result = train(load_recipe(path), show_progress=False)
    expected = logits(result.model)
    lab_model = (root / "home").resolve()
    monkeypatch.chdir(tmp_path)  # elsewhere: a relative record would no longer resolve
    adapter_config = result.final_dir / "adapter_config.json"
    if method["name"] == "full":
        assert not adapter_config.exists()
        card = (result.final_dir / "README.md").read_text()
        base = yaml.safe_load(card.split("---")[1])["base_model"]
        loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    else:
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        loaded = AutoPeftModelForCausalLM.from_pretrained(result.final_dir)
    assert base.startswith(str(lab_model)) and base.endswith("/model"), base
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
