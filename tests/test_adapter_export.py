"""save_lora_factors_as_peft: stock PEFT must load the files and reproduce W + B A exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from preserve_core.methods.adapter_export import save_lora_factors_as_peft
from tests.conftest import build_tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


def random_factors(model, ranks: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, r in ranks.items():
        m, n = model.get_submodule(name).weight.shape
        factors[name] = (torch.randn(r, n, generator=g) * 0.3, torch.randn(m, r, generator=g) * 0.3)
    return factors


def merged_copy(model, factors):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            merged.get_submodule(name).weight += b @ a
    return merged


@pytest.mark.parametrize("ranks", [{t: 5 for t in TARGETS}, dict(zip(TARGETS, [3, 7, 3], strict=True))])
def test_stock_peft_reproduces_factors(tmp_path, ranks):
    base = build_tiny_llama(vocab_size=48, seed=1).eval()
    factors = random_factors(base, ranks)
    save_lora_factors_as_peft(tmp_path, base, factors, tokenizer=None, base_model_name_or_path="some/base")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "some/base"
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, r in ranks.items():
        assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == r
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = merged_copy(base, factors)(ids).logits
        got = loaded(ids).logits
        plain = base(ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the factors matter
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rejects_misshapen_factors(tmp_path):
    base = build_tiny_llama(vocab_size=48)
    a, b = random_factors(base, {TARGETS[0]: 4})[TARGETS[0]]
    with pytest.raises(ValueError, match="do not fit"):
        save_lora_factors_as_peft(tmp_path, base, {TARGETS[0]: (a.T, b)}, None, None)
    with pytest.raises(ValueError, match="not a linear"):
        save_lora_factors_as_peft(tmp_path, base, {"model.layers.0": (a, b)}, None, None)
