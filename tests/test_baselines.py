"""Baselines replay / l2sp / ewc / kl (and the LoRA initialisations): their math on toy cases, and
each one training end to end through the engine on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    PRESERVE_TEXTS,
    assert_same_final_adapter,
    calibrated_recipe,
    fake_calibration,
    rewind_to_previous_checkpoint,
    run_recipe,
    stand_in_context,
)
from torch import nn

from preserve_core.checkpoint import TrainState
from preserve_core.data import IGNORE, build_train_dataset
from preserve_core.methods import METHODS
from preserve_core.methods.ewc import diagonal_fisher
from preserve_core.methods.forms import lora_delta, lora_delta_sq_norm
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe
from preserve_core.training import BatchStream


def make_method(path, extras: dict | None = None):
    """``(method, prepared model, recipe)`` for the recipe at ``path``, with a fake calibration."""
    recipe = load_recipe(path)
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, "cpu")
    cls = METHODS[recipe.method.name]
    if extras is None and cls.calibrate_extra.__func__ is not METHODS["full"].calibrate_extra.__func__:
        extras = {cls.name: cls.calibrate_extra(model.eval(), tokenizer, PRESERVE_TEXTS, recipe)}
    method = cls(recipe.method, stand_in_context(recipe, tokenizer, model, fake_calibration(model, extras)))
    return method, method.prepare_model(model), recipe


def test_replay_mixes_preserve_rows_at_ratio_rho(write_recipe):
    method, _, recipe = make_method(write_recipe(method={"name": "replay", "rho": 0.25}))
    task, _ = build_train_dataset(recipe, method.ctx.tokenizer)
    mixed = method.training_data(task)
    assert len(mixed) == len(task) + round(len(task) / 3)
    stream = BatchStream(mixed, 8, 0, 0, 0, 1, TrainState())
    shares = []
    for _ in range(3 * (len(mixed) // 8)):  # three epochs
        labels = stream.next()["labels"]
        shares.append(float(((labels[:, :1] != IGNORE)).float().mean()))  # task rows start with the masked prompt
    assert abs(sum(shares) / len(shares) - 0.25) < 0.02, shares
    replay_rows = [r for r in mixed if r["labels"][0] != IGNORE]
    assert all(r["labels"] == r["input_ids"] for r in replay_rows)


def test_l2sp_penalty_matches_definition(write_recipe):
    for form in ("full", "lora"):
        method, model, _ = make_method(write_recipe(form, method={"name": "l2sp", "form": form, "strength": 0.3, "r": 2}))
        assert float(method.penalty().detach()) == 0.0 and method.is_adapter == (form == "lora")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        expected = 0.15 * sum(float((d.detach() ** 2).sum()) for d in method.weight_deltas().values())
        assert float(method.penalty().detach()) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_lora_delta_norm_uses_gram_matrices():
    layer = SimpleNamespace(
        lora_A={"default": nn.Linear(5, 3, bias=False)}, lora_B={"default": nn.Linear(3, 7, bias=False)}, scaling={"default": 1.5}
    )
    with torch.no_grad():
        assert float(lora_delta_sq_norm(layer)) == pytest.approx(float((lora_delta(layer) ** 2).sum()), rel=1e-5)


class SoftmaxRegression(nn.Module):
    """``p(y | token) = softmax(W x_token)`` with fixed features ``x_token``: an LM with known Fisher."""

    def __init__(self, features: torch.Tensor, classes: int):
        super().__init__()
        self.register_buffer("features", features)
        self.linear = nn.Linear(features.shape[1], classes, bias=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.linear(self.features[input_ids]))


def test_fisher_matches_softmax_regression_closed_form():
    """Diagonal true Fisher of softmax regression: ``F[c, j] = mean_x p_c (1 - p_c) x_j^2``."""
    torch.manual_seed(0)
    model = SoftmaxRegression(torch.randn(6, 3), classes=4)
    sequences = torch.randint(0, 6, (1500, 3)).tolist()
    fisher = diagonal_fisher(model, ["linear.weight"], sequences, seed=1)["linear.weight"]
    with torch.no_grad():
        x = model.features[torch.tensor(sequences).flatten()]  # [N, 3]
        p = torch.softmax(model.linear(x), -1)  # [N, 4]
        exact = ((p * (1 - p)).T @ x**2) / len(x)  # [4, 3]
    torch.testing.assert_close(fisher, exact, rtol=0.1, atol=1e-3)


def test_ewc_penalty_uses_cached_fisher(write_recipe):
    method, model, _ = make_method(write_recipe(method={"name": "ewc", "strength": 2.0}))
    name = next(iter(method.fisher))
    assert method.fisher[name].shape == dict(model.named_parameters())[name].shape
    assert all(bool((f >= 0).all()) and float(f.sum()) > 0 for f in method.fisher.values())
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(0.1)
    assert float(method.penalty().detach()) == pytest.approx(0.01 * float(method.fisher[name].sum()), rel=1e-4)


@pytest.mark.parametrize("form,reference", [("full", "frozen"), ("lora", "frozen"), ("full", "cached"), ("lora", "cached")])
def test_kl_is_zero_at_step_zero_and_grows_after_a_change(write_recipe, form, reference):
    method, model, _ = make_method(write_recipe(method={"name": "kl", "form": form, "reference": reference, "r": 2}))
    model.train()
    assert abs(float(method.extra_loss(model, {}, None).detach())) < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    assert float(method.extra_loss(model, {}, None).detach()) > 1e-4
    assert int(method.state_dict()["preserve_draws"]) == 2


def test_kl_resume_is_exact(write_recipe, tmp_path):
    method = {"name": "kl", "form": "lora", "r": 2, "alpha": 4, "strength": 5.0, "preserve_batch_size": 5}
    common = {"max_steps": 4, "save_every": 2, "keep_last": 5, "grad_accum": 2}
    straight = run_recipe(calibrated_recipe(write_recipe, tmp_path, "kl-straight", method, **common))
    path = calibrated_recipe(write_recipe, tmp_path, "kl-resumed", method, **common)
    first = run_recipe(path)
    rewind_to_previous_checkpoint(first.run_dir)
    run_recipe(path, resume=True)
    assert_same_final_adapter(straight.run_dir, first.run_dir, atol=1e-6)


@pytest.mark.parametrize("name", ["pissa", "milora", "corda_kpm"])
def test_residual_inits_keep_the_output_and_fill_the_adapter(write_recipe, name):
    recipe_path = write_recipe(name, method={"name": name, "r": 2, "alpha": 4})
    ids = torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41]])
    base = load_model(load_recipe(recipe_path).model, "cpu").eval()
    method, model, _ = make_method(recipe_path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    layer_name, layer = next(iter(method.lora_layers.items()))
    w = base.get_submodule(layer_name).weight.detach()
    moved = lora_delta(layer).detach()
    assert float(moved.norm()) > 0
    torch.testing.assert_close(layer.get_base_layer().weight + moved, w, atol=1e-5, rtol=1e-5)
    singular = torch.linalg.svdvals(w)
    if name in ("pissa", "milora"):  # the moved part is W's top (pissa) or bottom (milora) 2 singular triplets
        expected = singular[:2] if name == "pissa" else singular[-2:]
        torch.testing.assert_close(torch.linalg.svdvals(moved)[:2], expected, atol=1e-4, rtol=1e-4)
    else:  # in C-whitened coordinates the moved part is the bottom 2 singular triplets of W C
        c = method.ctx.calibration.preserve_cov(layer_name)
        c = c + 0.01 * c.diagonal().mean() * torch.eye(c.shape[0])
        expected = torch.linalg.svdvals(w @ c)[-2:]
        torch.testing.assert_close(torch.linalg.svdvals(moved @ c)[:2], expected, atol=1e-4, rtol=1e-3)
