"""Tests for mutants that survived `make mutation` (docs/reliability.md, "Mutation testing").

Each states the mutant it kills; the answers are written by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_char_tokenizer

from preserve_core.errors import RecipeError
from preserve_core.evaluation.tasks import _encode_multiple_choice
from preserve_core.methods.fora.bases import orthonormal_complement
from preserve_core.recipe_schema import EvalTask

TOKENIZER = build_char_tokenizer()


def _mc_task(tmp_path, rows) -> EvalTask:
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return EvalTask(name="mc", kind="multiple_choice", data=str(path))


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "0 <= answer < len(choices)"),  # answer == len: '<' not '<='
        ({"prompt": "q", "choices": [], "answer": 0}, "non-empty choices"),  # 'or' not 'and'
        ({"prompt": "q", "choices": ["a"], "answer": -1}, "0 <= answer"),
        ({"choices": ["a", "b"], "answer": 0}, "['prompt']"),  # the prompt column is required
        ({"prompt": "q", "choices": ["a", "b"]}, "['answer']"),
        ({"prompt": "q", "answer": 0}, "['choices']"),
    ],
)
def test_multiple_choice_rows_are_checked(tmp_path, row, words):
    with pytest.raises(RecipeError) as err:
        _encode_multiple_choice(_mc_task(tmp_path, [row]), TOKENIZER)
    assert words in str(err.value)


def test_multiple_choice_items_by_hand(tmp_path):
    """Prompt 'ab' -> [bos, a, b]; choices 'c', 'de' appended; spans and answers as given."""
    items, spans, answers, lengths = _encode_multiple_choice(
        _mc_task(tmp_path, [{"prompt": "ab", "choices": ["c", "de"], "answer": 1}]), TOKENIZER
    )
    head = [TOKENIZER.bos_token_id, *TOKENIZER("ab", add_special_tokens=False)["input_ids"]]
    assert items == [(head + TOKENIZER("c", add_special_tokens=False)["input_ids"], 3),
                     (head + TOKENIZER("de", add_special_tokens=False)["input_ids"], 3)]  # fmt: skip
    assert spans == [(0, 2)] and answers == [1] and lengths == [1, 2]


def test_orthonormal_complement_keeps_dtype_and_completes_the_basis():
    q = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0]  # float32 [6, 2]
    q_c = orthonormal_complement(q)
    assert q_c.dtype == torch.float32 and q_c.shape == (6, 4)
    full = torch.cat([q, q_c], dim=1).double()
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


# -- survivors of the seed-1 sample (2026-11-29, docs/reliability.md) ----------------------------------


def test_fora_full_form_optimizer_takes_the_recipes_adam_settings():
    """Kills `eps=training.adam_eps` dropped from FORA's ProjectedAdamW (AdamW's 1e-8 default stood in)."""
    from types import SimpleNamespace

    from test_methods_hooks_known_answers import fora

    method = fora("full")
    model = torch.nn.ModuleDict({n: layer for n, layer in method.layers.items()})
    training = SimpleNamespace(lr=0.25, adam_betas=(0.8, 0.9), adam_eps=3e-4, decay=0.0)
    group = method.build_optimizer(model, training).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.25, (0.8, 0.9), 3e-4, 0.0)


def test_projected_adamw_loaded_state_is_a_copy():
    """Kills `copy=True` dropped in ProjectedAdamW.load_state_dict: the optimizer must not alias the dict it loaded."""
    from preserve_core.methods.fora.optim import ProjectedAdamW

    w = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    opt = ProjectedAdamW([w], lr=0.1, projectors={w: (torch.eye(3)[:, :1], torch.zeros(2, 0))})
    w.grad = torch.ones_like(w)
    opt.step()
    saved = opt.state_dict()
    fresh = ProjectedAdamW([w], lr=0.1, projectors={w: (torch.eye(3)[:, :1], torch.zeros(2, 0))})
    fresh.load_state_dict(saved)
    kept = ("master", "exp_avg", "exp_avg_sq")  # the float32 state ProjectedAdamW restores itself
    assert set(kept) <= set(saved["state"][0])
    before = {k: fresh.state[w][k].clone() for k in kept}
    for key in kept:
        saved["state"][0][key].add_(100.0)
    for key, value in before.items():
        assert torch.equal(fresh.state[w][key], value), key


def test_peft_adapter_file_says_format_pt(tmp_path):
    """Kills the safetensors metadata `{"format": "pt"}` changed: transformers' loaders read it."""
    from safetensors import safe_open
    from torch import nn

    from preserve_core.methods.adapter_export import save_lora_factors_as_peft

    base = nn.Sequential()
    base.add_module("proj", nn.Linear(4, 3, bias=False))
    factors = {"proj": (torch.ones(2, 4), torch.ones(3, 2))}
    save_lora_factors_as_peft(tmp_path, base, factors, None, "base-path")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_replay_order_is_seeded_not_global():
    """Kills the seeded generator dropped from replay's row order (the global RNG would decide it)."""
    from preserve_core.methods.regularizers.replay import preserve_rows

    texts = ["abc", "defg", "hijkl", "mnopqr", "stuvwxy"]
    torch.manual_seed(0)
    first = preserve_rows(texts, TOKENIZER, 16, 5, seed=3)
    torch.manual_seed(1)
    torch.randperm(7)
    second = preserve_rows(texts, TOKENIZER, 16, 5, seed=3)
    assert first == second
    assert len({tuple(r) for r in first["input_ids"]}) == 5  # one full cycle: every text once


def test_topk_kl_is_finite_when_the_top_k_hold_all_the_mass():
    """Kills the clamp `max=1 - 1e-7` loosened in topk_kl: with k = V the student's top-k mass is 1 and
    log1p(-1) = -inf would make the loss or its gradient non-finite."""
    from preserve_core.methods.kl_terms import topk_kl

    student = torch.tensor([[[30.0, 0.0, 0.0]]], requires_grad=True)  # softmax: [1, ~1e-13, ~1e-13] in float32
    top_ids = torch.tensor([[[0, 1, 2]]])
    top_logp0 = torch.log_softmax(torch.tensor([[[30.0, 0.0, 0.0]]]), dim=-1)
    loss = topk_kl(student, top_ids, top_logp0, torch.ones(1, 1), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and abs(float(loss.detach())) < 1e-6
    assert torch.isfinite(student.grad).all()


def test_merged_input_stats_keep_their_layout():
    """Kills `InputStats.merge` dropping the layout (later passes look inputs up through it)."""
    from preserve_core.calibration.stats import InputStats

    layout = object()
    a = InputStats(layout, {"x": 1}, {"x": 2})
    merged = a.merge(InputStats(layout, {"y": 3}, {"y": 4}))
    assert merged.layout is layout
    assert merged.sums == {"x": 1, "y": 3} and merged.counts == {"x": 2, "y": 4}


def test_kl_calibration_extra_reads_kl_options_only_from_a_kl_recipe(write_recipe):
    """Kills `own or True` in FormWithRegularizer.calibrate_extra: for a recipe of another method (a
    composition), the regulariser's defaults apply; the method's own options are not kl's."""
    from preserve_core.methods.kl import Kl
    from preserve_core.methods.regularizer_options import KlRegularizerOptions
    from preserve_core.models import load_model, load_tokenizer
    from preserve_core.recipe import load_recipe

    foreign = load_recipe(write_recipe("lora", method={"name": "lora", "r": 2, "alpha": 4}))
    own = load_recipe(write_recipe("kl", method={"name": "kl", "temperature": 3.0}))
    tokenizer, model = load_tokenizer(foreign.model), load_model(foreign.model, "cpu").eval()
    texts = ["abc def", "hello"]
    default = KlRegularizerOptions().temperature
    assert default != 3.0
    assert float(Kl.calibrate_extra(model, tokenizer, texts, foreign)["temperature"]) == default
    assert float(Kl.calibrate_extra(model, tokenizer, texts, own)["temperature"]) == 3.0
