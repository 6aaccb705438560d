"""Regulariser composition (``method.regularizers``): strict validation, the baselines as a form plus
one regulariser (same numbers), penalties and KL on FORA checked from their definitions in float64,
calibration extras as the union, and exact resume with regularisers."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    PRESERVE_TEXTS,
    calibrated_recipe,
    fake_calibration,
    rewind_to_previous_checkpoint,
    run_recipe,
    stand_in_context,
)
from safetensors.torch import load_file
from test_recipe_and_cli import cli

from preserve_core.methods.kl_terms import PreserveBatches, pad_sequences
from preserve_core.methods.regularizers import Regularizers
from preserve_core.methods.regularizers.kl import preserve_sequences
from preserve_core.methods import METHODS
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe

FORA_FULL = {"name": "fora", "form": "full", "rank": 4, "u_rank": 2, "spectral_size": 2}


@pytest.mark.parametrize(
    "regularizers,expect",
    [
        ([{"name": "kll"}], "unknown regulariser 'kll'. Did you mean 'kl'?"),
        ([{"name": "kl", "strenght": 1}], "method.regularizers.0.strenght: unknown key. Did you mean 'strength'?"),
        ([{"name": "replay", "rho": 1.5}], "method.regularizers.0.rho"),
        ([{"name": "kl"}, {"name": "replay"}, {"name": "kl", "strength": 2}], "kl listed more than once"),
    ],
)
def test_bad_regularizers_exit_2_with_the_key(write_recipe, regularizers, expect):
    result = cli("validate", write_recipe(method={**FORA_FULL, "regularizers": regularizers}))
    assert result.exit_code == 2 and expect in " ".join(result.output.split()), result.output


def test_a_baseline_cannot_take_its_own_regulariser_and_residual_inits_take_no_weight_penalty(write_recipe):
    result = cli("validate", write_recipe(method={"name": "kl", "regularizers": [{"name": "kl"}]}))
    assert result.exit_code == 2 and "already is the kl regulariser" in result.output
    for weight_penalty in ("l2sp", "leak"):
        result = cli("validate", write_recipe(method={"name": "pissa", "r": 2, "regularizers": [{"name": weight_penalty}]}))
        assert result.exit_code == 2 and f"the {weight_penalty} regulariser penalises" in result.output
    ok = cli("validate", write_recipe(method={"name": "pissa", "r": 2, "regularizers": [{"name": "kl"}]}))
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    "baseline,composed",
    [
        ({"name": "kl", "strength": 3.0, "preserve_batch_size": 4}, {"name": "full"}),
        ({"name": "replay", "rho": 0.3, "form": "lora", "r": 2, "alpha": 4}, {"name": "lora", "r": 2, "alpha": 4}),
        ({"name": "l2sp", "strength": 50.0}, {"name": "full"}),
    ],
)
def test_baseline_equals_its_form_plus_the_regulariser(write_recipe, tmp_path, baseline, composed):
    """``kl`` == ``full`` + kl regulariser (and so on), bitwise: the refactor changed no result."""
    options = {k: v for k, v in baseline.items() if k not in ("name", "form", "r", "alpha")}
    composed = {**composed, "regularizers": [{"name": baseline["name"], **options}]}
    a = run_recipe(calibrated_recipe(write_recipe, tmp_path, "baseline", baseline, grad_accum=2))
    b = run_recipe(calibrated_recipe(write_recipe, tmp_path, "composed", composed, grad_accum=2))
    assert [m["loss"] for m in a.metrics if "loss" in m] == [m["loss"] for m in b.metrics if "loss" in m]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def perturbed_fora(write_recipe, form: str, regularizers: list[dict], **options):
    """A prepared FORA model (fake calibration) with its regularisers attached, trainables moved randomly."""
    extra = {"r": 2} if form == "lora" else {}
    recipe = load_recipe(write_recipe(method={**FORA_FULL, "form": form, **extra, **options, "regularizers": regularizers}))
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, "cpu")
    calibration = fake_calibration(model)
    calibration.input_key = lambda name: name
    assert calibration.preserve_texts == PRESERVE_TEXTS
    method = METHODS["fora"](recipe.method, stand_in_context(recipe, tokenizer, model, calibration))
    model = method.prepare_model(model)
    regs = Regularizers(recipe.method.regularizers, method.ctx)
    regs.attach(model, method)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return method, model, recipe, regs


@pytest.mark.parametrize("form", ["full", "lora"])
def test_l2sp_on_fora_is_half_alpha_times_the_merged_weight_change(write_recipe, form):
    method, model, recipe, regs = perturbed_fora(write_recipe, form, [{"name": "l2sp", "strength": 0.4}])
    base = load_model(recipe.model, "cpu")
    expected = 0.0
    for name, layer in method.layers.items():  # merged W + dW against the untouched model's W, float64
        w0 = base.get_submodule(name).weight.double()
        expected += float(((layer.merged_weight().double() - w0.detach()) ** 2).sum())
    assert expected > 0
    assert float(regs.extra_loss(model, {}, None).detach()) == pytest.approx(0.2 * expected, rel=1e-4)


def test_kl_regulariser_on_fora_matches_the_definition(write_recipe):
    """``lambda T^2 mean_positions KL(p_0^T || p^T)`` against the untouched model, in float64."""
    reg = {"name": "kl", "strength": 0.5, "temperature": 2.0, "preserve_batch_size": 3, "seed": 7}
    method, model, recipe, regs = perturbed_fora(write_recipe, "full", [reg])
    base = load_model(recipe.model, "cpu").eval()
    ids, lengths = pad_sequences(preserve_sequences(method.ctx.calibration.preserve_texts, method.ctx.tokenizer, 32), 0)
    index = PreserveBatches(len(lengths), 3, 7).next()
    model.eval()
    with torch.no_grad():
        got = float(regs.extra_loss(model, {}, None))
        total, count = 0.0, 0
        for i in index:  # one sequence at a time, no padding
            x = ids[i : i + 1, : int(lengths[i])]
            log_p = torch.log_softmax(model(input_ids=x).logits.double() / 2, -1)
            log_p0 = torch.log_softmax(base(input_ids=x).logits.double() / 2, -1)
            total += float((log_p0.exp() * (log_p0 - log_p)).sum())
            count += x.shape[1]
    assert total > 0 and got == pytest.approx(0.5 * 4 * total / count, rel=1e-4)
    assert int(regs.state_dict()["kl/preserve_draws"]) == 1


def test_fora_with_ewc_and_kl_calibrates_the_union_and_trains(write_recipe, tmp_path):
    method = {**FORA_FULL, "regularizers": [{"name": "ewc", "strength": 2.0}, {"name": "kl", "reference": "cached"}]}
    result = run_recipe(calibrated_recipe(write_recipe, tmp_path, "fora-ewc-kl", method))
    cal = load_recipe(calibrated_recipe(write_recipe, tmp_path, "fora-ewc-kl", method)).calibration_dir()
    import json

    manifest = json.loads((cal / "manifest.json").read_text())
    assert manifest["extras"] == ["ewc", "kl"] and (cal / "preserve_stats.safetensors").exists()
    assert json.loads((result.run_dir / "manifest.json").read_text())["regularizers"] == ["ewc", "kl"]


def test_resume_with_regularizers_is_exact(write_recipe, tmp_path):
    method = {**FORA_FULL, "regularizers": [{"name": "kl", "strength": 2.0, "preserve_batch_size": 3}, {"name": "replay", "rho": 0.3},
                                            {"name": "leak", "strength": 500.0}]}  # fmt: skip
    common = {"max_steps": 4, "save_every": 2, "keep_last": 5, "grad_accum": 2}
    straight = run_recipe(calibrated_recipe(write_recipe, tmp_path, "straight", method, **common))
    path = calibrated_recipe(write_recipe, tmp_path, "resumed", method, **common)
    first = run_recipe(path)
    resume_from = rewind_to_previous_checkpoint(first.run_dir)
    assert int(load_file(resume_from / "regularizers.safetensors")["kl/preserve_draws"]) == 4
    run_recipe(path, resume=True)
    a = load_file(straight.run_dir / "final" / "model.safetensors")
    b = load_file(first.run_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_rows_are_labelled_with_their_regularizers():
    from preserve_core.bench import default_label

    assert default_label({"name": "fora", "regularizers": [{"name": "kl"}, {"name": "replay", "rho": 0.1}]}) == "fora+kl+replay"
    assert default_label({"name": "kl"}) == "kl"


@pytest.mark.parametrize("form,spectral_size", [("full", 2), ("lora", 2), ("full", 0), ("lora", 0)])
def test_leak_on_fora_is_the_mean_relative_output_change_on_preserve_inputs(write_recipe, form, spectral_size):
    """``(lambda/N) sum tr(dW C_p dW^T) / tr(W_0 C_p W_0^T)`` from merged weights and C_p, float64. Without a
    spectral channel the penalty reads C_p only on Q's complement (``delta_row_basis``): same value."""
    method, model, recipe, regs = perturbed_fora(
        write_recipe, form, [{"name": "leak", "strength": 3.0}], spectral_size=spectral_size
    )
    base = load_model(recipe.model, "cpu")
    if form == "full":  # as the projected AdamW would have moved W: dW Q = 0
        with torch.no_grad():
            for name, layer in method.layers.items():
                w0 = base.get_submodule(name).weight
                layer.base.weight.copy_(w0 + layer.projector(layer.base.weight - w0))
    factors = regs.items[0].factors
    assert all(f.shape[1] <= (f.shape[0] - method.layers[n[:-7]].projector.rank if not spectral_size else f.shape[0])
               for n, f in factors.items())  # fmt: skip
    ratios = []
    for name, layer in method.layers.items():
        w0 = base.get_submodule(name).weight.detach().double()
        dw = layer.merged_weight().detach().double() - w0.detach()
        cov = method.ctx.calibration.preserve_cov(name).double()
        ratios.append(float(torch.trace(dw @ cov @ dw.T) / torch.trace(w0 @ cov @ w0.T)))
    assert min(ratios) > 0
    got = regs.extra_loss(model, {}, None)
    assert float(got.detach()) == pytest.approx(3.0 * sum(ratios) / len(ratios), rel=1e-4)
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_leak_factor_of_a_rank_deficient_second_moment():
    from preserve_core.methods.regularizers.leak import covariance_factor

    x = torch.tensor([[1.0, 2, 0, -1, 3, 0], [0, 1, 1, 0, -2, 1], [2, 0, -1, 1, 0, 0]], dtype=torch.float64)
    cov = x.T @ x / 3  # rank 3 of 6
    factor = covariance_factor(torch.triu(cov))  # only the upper triangle is read
    assert factor.shape == (6, 3) and factor.dtype == torch.float32
    torch.testing.assert_close(factor.double() @ factor.double().T, cov, atol=1e-5, rtol=1e-5)


def test_leak_trains_fora_lora_from_the_cli(write_recipe, tmp_path):
    method = {"name": "fora", "form": "lora", "r": 2, "rank": 4, "regularizers": [{"name": "leak", "strength": 50.0}]}
    result = run_recipe(calibrated_recipe(write_recipe, tmp_path, "fora-leak", method))
    import json

    assert json.loads((result.run_dir / "manifest.json").read_text())["regularizers"] == ["leak"]
    assert (result.run_dir / "final" / "adapter_model.safetensors").exists()


def test_delta_factors_multiply_to_the_weight_change(write_recipe):
    """LoRA (PEFT) and FoLoRA: ``B A`` from ``delta_factors`` equals the model's own weight change."""
    from test_baselines import make_method

    from preserve_core.methods.folora.layer import FoloraLinear
    from preserve_core.methods.folora.method import Folora
    from types import SimpleNamespace

    method, model, _ = make_method(write_recipe(method={"name": "lora", "r": 2, "alpha": 4}))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    merged = {n: p.detach().clone() for n, p in model.merge_and_unload().named_parameters()}
    base = load_model(load_recipe(write_recipe(method={"name": "lora"})).model, "cpu")
    factors = method.delta_factors()
    assert len(factors) == len(method.lora_layers) > 0
    for name, (a, b) in factors.items():
        torch.testing.assert_close(b @ a, merged[name] - base.get_submodule(name.removesuffix(".weight")).weight, atol=1e-6, rtol=1e-5)
    layer = FoloraLinear(torch.nn.Linear(5, 3), torch.linalg.qr(torch.randn(5, 4))[0], r=2, alpha=6.0, dropout=0.0, init_std=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    (a, b), = Folora.delta_factors(SimpleNamespace(wrappers={"x": layer})).values()
    x = torch.randn(7, 5)
    torch.testing.assert_close(x @ a.T @ b.T, layer(x) - layer.base_layer(x))  # the branch the forward adds


def test_leak_refuses_row_sharded_full_form_updates():
    from types import SimpleNamespace

    from preserve_core.errors import PPFTError
    from preserve_core.methods.regularizer_options import LeakRegularizerOptions
    from preserve_core.methods.regularizers.leak import LeakRegularizer

    leak = LeakRegularizer(LeakRegularizerOptions(), SimpleNamespace())
    leak.on_sharded(None, SimpleNamespace(row_sharded_deltas=False))  # LoRA forms under FSDP: fine
    with pytest.raises(PPFTError, match="leak with a row-sharded form: full under FSDP is not supported"):
        leak.on_sharded(None, SimpleNamespace(row_sharded_deltas=True))
