"""Known answers for the KL and EWC regularisers' own code, on the tiny Llama without a training run.

The KL reference is built here from the definition: ``lambda T^2 KL(p_0^T || p^T)`` averaged over the
real positions of the preserve batch, with ``p_0`` from an untouched copy of the model (float64).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import build_char_tokenizer, build_tiny_llama
from preserve_core.errors import PPFTError, RecipeError
from preserve_core.methods.kl_terms import PreserveBatches
from preserve_core.methods.regularizer_options import EwcRegularizerOptions, KlRegularizerOptions
from preserve_core.methods.regularizers.ewc import EwcRegularizer, fisher_parameter_names
from preserve_core.methods.regularizers.kl import KlRegularizer, rank_world, trainable_snapshot

TEXTS = ["abc", "de", "fghij", "", "k"]  # the empty text gives [bos] only and is kept; max_length 5 cuts "fghij"
TRAINED = "model.layers.0.mlp.down_proj"


def kl_setup(**options):
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.requires_grad_(False)
    model.get_submodule(TRAINED).requires_grad_(True)
    ctx = SimpleNamespace(
        calibration=SimpleNamespace(preserve_texts=TEXTS), tokenizer=tokenizer,
        recipe=SimpleNamespace(data=SimpleNamespace(max_length=5)), device=torch.device("cpu"),
    )  # fmt: skip
    regularizer = KlRegularizer(KlRegularizerOptions(**{"preserve_batch_size": 2, "seed": 4, **options}), ctx)
    return regularizer, model, tokenizer


def test_kl_attach_encodes_pads_and_snapshots():
    regularizer, model, tokenizer = kl_setup()
    base = copy.deepcopy(model)
    regularizer.attach(model, SimpleNamespace())
    assert regularizer.lengths.tolist() == [4, 3, 5, 1, 2]  # [bos] + text, cut to 5
    assert regularizer.ids.shape == (5, 5) and int(regularizer.ids[1, 3]) == tokenizer.pad_token_id
    assert regularizer.ids[2].tolist() == [tokenizer.bos_token_id] + tokenizer("fghi", add_special_tokens=False)["input_ids"]
    assert set(regularizer.theta0) == {f"{TRAINED}.weight"}
    assert regularizer.theta0[f"{TRAINED}.weight"].data_ptr() != model.get_submodule(TRAINED).weight.data_ptr()
    assert (regularizer.batches.n, regularizer.batches.batch_size, regularizer.batches.seed) == (5, 2, 4)
    assert (regularizer.batches.rank, regularizer.batches.world) == (0, 1) == rank_world()
    torch.testing.assert_close(regularizer.theta0[f"{TRAINED}.weight"], base.get_submodule(TRAINED).weight, atol=0, rtol=0)
    kept = {"w": torch.ones(1)}
    assert trainable_snapshot(model, SimpleNamespace(theta0=kept)) is kept  # the method's own theta_0, no copy


def test_kl_preserve_batch_and_loss_by_hand():
    regularizer, model, _ = kl_setup(strength=2.0, temperature=3.0)
    base = copy.deepcopy(model)
    regularizer.attach(model, SimpleNamespace())
    assert float(regularizer.extra_loss(model, {}, None)) == pytest.approx(0.0, abs=1e-6)  # at theta_0
    with torch.no_grad():
        model.get_submodule(TRAINED).weight.add_(0.3)
    order = PreserveBatches(5, 2, 4)
    order.next()
    index = order.next()  # the regulariser's second draw
    lengths = torch.tensor([4, 3, 5, 1, 2])[index]
    width = int(lengths.max())
    got_index, ids, mask = regularizer.preserve_batch()
    assert got_index == index and ids.shape == (2, width)
    assert mask.tolist() == [[1 if t < n else 0 for t in range(width)] for n in lengths.tolist()]
    regularizer.batches.draws = 1
    loss = regularizer.extra_loss(model, {}, None)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double() / 3.0, -1)
        p0 = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.double() / 3.0, -1)
    per_position = (p0.exp() * (p0 - p)).sum(-1)
    expected = 2.0 * 9.0 * float((per_position * mask).sum() / mask.sum())
    assert expected > 1e-4 and float(loss.detach()) == pytest.approx(expected, rel=1e-3)  # the loss runs in float32
    assert loss.requires_grad
    assert set(regularizer.state_dict()) == {"preserve_draws"} and int(regularizer.state_dict()["preserve_draws"]) == 2
    regularizer.load_state_dict({"preserve_draws": torch.tensor(7)})
    assert regularizer.batches.draws == 7


def test_kl_strength_zero_and_cached_reference_checks():
    regularizer, model, _ = kl_setup(strength=0.0)
    regularizer.attach(model, SimpleNamespace())
    assert regularizer.extra_loss(model, {}, None) is None and regularizer.batches.draws == 0
    assert KlRegularizer.has_calibration_extra(KlRegularizerOptions(reference="cached")) is True
    assert KlRegularizer.has_calibration_extra(KlRegularizerOptions()) is False
    cached, model, _ = kl_setup(reference="cached", temperature=2.0)
    cache = {"temperature": torch.tensor(1.5), "ids": torch.zeros(3, 4, dtype=torch.long), "lengths": torch.tensor([4, 2, 3])}
    cached.ctx.calibration.extra = lambda name: cache if name == "kl" else None
    with pytest.raises(RecipeError, match=r"temperature 1\.5, the recipe asks 2\.0; rerun `ppft calibrate <recipe> --force`"):
        cached.attach(model, SimpleNamespace())
    cache["temperature"] = torch.tensor(2.0 + 5e-7)  # within 1e-6: the same temperature
    cached.attach(model, SimpleNamespace())
    assert cached.ids is cache["ids"] and cached.batches.n == 3 and not hasattr(cached, "theta0")


# -- EWC ----------------------------------------------------------------------------------------


def test_fisher_parameter_names_are_the_targets_and_optionally_the_embeddings():
    model = build_tiny_llama(40)
    recipe = SimpleNamespace(model=SimpleNamespace(target_modules=["q_proj"], train_embeddings=False))
    assert fisher_parameter_names(model, recipe) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    recipe.model.train_embeddings = True
    names = fisher_parameter_names(model, recipe)
    assert names[:2] == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert sorted(names[2:]) == ["lm_head.weight", "model.embed_tokens.weight"]
    recipe.model.target_modules = ["lm_head"]
    assert fisher_parameter_names(model, recipe) == ["lm_head.weight", "model.embed_tokens.weight"]  # no repeat


class _Deltas:
    """A method whose weight change is fixed: ``dW["a"] = [[1, -2]]``, ``dW["b"] = [[3]]``."""

    def __init__(self):
        self.tracked = 0
        self.a = torch.tensor([[1.0, -2.0]], requires_grad=True)

    def track_weight_deltas(self):
        self.tracked += 1

    def delta_names(self):
        return ["a", "b"]

    def weight_deltas(self):
        return {"a": self.a, "b": torch.tensor([[3.0]])}


def test_ewc_attach_and_penalty_by_hand():
    fisher = {"a": torch.tensor([[2.0, 0.5]]), "b": torch.tensor([[4.0]]), "unused": torch.ones(1)}
    ctx = SimpleNamespace(calibration=SimpleNamespace(extra=lambda name: fisher if name == "ewc" else {}), device=torch.device("cpu"))
    regularizer = EwcRegularizer(EwcRegularizerOptions(strength=0.5), ctx)
    method = _Deltas()
    regularizer.attach(None, method)
    assert method.tracked == 1 and set(regularizer.fisher) == {"a", "b"}
    penalty = regularizer.extra_loss(None, {}, None)  # (0.5 / 2) (2 * 1 + 0.5 * 4 + 4 * 9) = 10
    assert float(penalty.detach()) == pytest.approx(10.0)
    penalty.backward()
    torch.testing.assert_close(method.a.grad, torch.tensor([[0.5 * 2.0 * 1.0, 0.5 * 0.5 * -2.0]]))  # lambda F dW
    assert EwcRegularizer(EwcRegularizerOptions(strength=0.0), ctx).extra_loss(None, {}, None) is None
    assert EwcRegularizer.has_calibration_extra(EwcRegularizerOptions()) is True
    lacking = EwcRegularizer(EwcRegularizerOptions(), SimpleNamespace(calibration=SimpleNamespace(extra=lambda name: {"a": fisher["a"]})))
    with pytest.raises(PPFTError, match=r"ewc: the cached Fisher lacks \['b'\] .*rerun `ppft calibrate <recipe> --force`"):
        lacking.attach(None, _Deltas())


# -- forms (the parametrisation the baselines regularise) ----------------------------------------


def test_unfreeze_targets_and_lora_config():
    from preserve_core.methods.forms import lora_config, unfreeze_targets

    model = build_tiny_llama(40)
    unfreeze_targets(model, [TRAINED], train_embeddings=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{TRAINED}.weight"]
    unfreeze_targets(model, [TRAINED], train_embeddings=True)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        ["lm_head.weight", f"{TRAINED}.weight", "model.embed_tokens.weight"])  # fmt: skip
    options = SimpleNamespace(r=3, alpha=6.0, dropout=0.1, use_rslora=True)
    config = lora_config(options, (TRAINED,), init_lora_weights="pissa")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (3, 6.0, 0.1, True)
    assert list(config.target_modules) == [TRAINED] and config.bias == "none" and config.init_lora_weights == "pissa"
    assert str(config.task_type).endswith("CAUSAL_LM")


def test_full_form_deltas_and_their_squared_norm():
    from preserve_core.methods.l2sp import L2sp, L2spOptions

    ctx = SimpleNamespace(target_modules=[TRAINED], recipe=SimpleNamespace(model=SimpleNamespace(train_embeddings=False)))
    method = L2sp(L2spOptions(strength=1.0), ctx)
    model = method.prepare_model(build_tiny_llama(40))
    assert method.delta_names() == [f"{TRAINED}.weight"] and method.is_adapter is False
    weight = model.get_submodule(TRAINED).weight
    with torch.no_grad():
        weight.add_(0.5)
    deltas = method.weight_deltas()
    torch.testing.assert_close(deltas[f"{TRAINED}.weight"], torch.full(weight.shape, 0.5))
    assert float(method.weight_delta_sq_norm().detach()) == pytest.approx(0.25 * weight.numel())
    assert float(method.regularizer.extra_loss(model, {}, None).detach()) == pytest.approx(0.5 * 0.25 * weight.numel())


def test_lora_form_deltas_are_s_b_a():
    from preserve_core.methods.forms import lora_delta, lora_delta_sq_norm, lora_factors
    from preserve_core.methods.l2sp import L2sp, L2spOptions

    ctx = SimpleNamespace(target_modules=[TRAINED], recipe=SimpleNamespace(model=SimpleNamespace(train_embeddings=False)))
    method = L2sp(L2spOptions(form="lora", r=2, alpha=3.0), ctx)
    method.prepare_model(build_tiny_llama(40))
    layer = method.lora_layers[TRAINED]
    a, b, s = lora_factors(layer)
    assert s == 1.5 and a.shape == (2, 64) and b.shape == (32, 2) and method.is_adapter is True
    with torch.no_grad():
        b.copy_(torch.arange(64.0).reshape(32, 2) / 64)
    expected = 1.5 * b.detach().double() @ a.detach().double()
    torch.testing.assert_close(lora_delta(layer).detach().double(), expected, atol=1e-6, rtol=1e-5)
    assert float(lora_delta_sq_norm(layer).detach()) == pytest.approx(float((expected**2).sum()), rel=1e-5)
    assert method.delta_names() == [f"{TRAINED}.weight"]
    assert float(method.weight_delta_sq_norm().detach()) == pytest.approx(float((expected**2).sum()), rel=1e-5)


# -- replay and the regulariser collection -------------------------------------------------------


def test_replay_count_and_rows():
    from preserve_core.methods.regularizers.replay import preserve_rows, replay_count

    assert [replay_count(n, rho) for n, rho in ((30, 0.25), (10, 0.5), (7, 0.0), (3, 0.1))] == [10, 10, 0, 0]
    tokenizer = build_char_tokenizer()
    rows = preserve_rows(["abcdef", "", "gh"], tokenizer, 4, 5, seed=2)  # "" gives [bos] alone: nothing to learn
    encoded = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("abc", "gh")]
    order = torch.randperm(2, generator=torch.Generator().manual_seed(2)).tolist()
    assert rows["input_ids"] == [encoded[order[i % 2]] for i in range(5)]  # cut to 4 tokens, cycled
    assert rows["labels"] == rows["input_ids"] and rows["labels"][0] is not rows["input_ids"][0]
    with pytest.raises(ValueError, match="^replay: no preserve text has a token to learn from$"):
        preserve_rows(["", ""], tokenizer, 4, 1, seed=0)
    assert preserve_rows([""], tokenizer, 4, 0, seed=0) == {"input_ids": [], "labels": []}


class _Fixed:
    def __init__(self, name, loss, state=None):
        self.name, self.loss, self.state, self.loaded = name, loss, state or {}, None

    def extra_loss(self, model, batch, outputs):
        return self.loss

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def test_regularizers_sum_their_losses_and_prefix_their_state():
    from preserve_core.methods.regularizers import Regularizers, regularizer_needs
    from preserve_core.methods.base import PRESERVE_DATA
    from preserve_core.methods.regularizer_options import L2spRegularizerOptions

    collection = Regularizers([], None)
    assert len(collection) == 0 and collection.extra_loss(None, {}, None) is None
    collection.items = [_Fixed("kl", None, {"draws": torch.tensor(3)}), _Fixed("ewc", torch.tensor(2.0)), _Fixed("l2sp", torch.tensor(0.5))]
    assert float(collection.extra_loss(None, {}, None)) == 2.5
    assert set(collection.state_dict()) == {"kl/draws"}
    collection.load_state_dict({"kl/draws": torch.tensor(4), "ewc/x": torch.tensor(1), "kl2/y": torch.tensor(0)})
    assert set(collection.items[0].loaded) == {"draws"} and set(collection.items[1].loaded) == {"x"}
    assert collection.items[2].loaded == {}
    assert regularizer_needs([L2spRegularizerOptions()]) == frozenset()
    assert regularizer_needs([L2spRegularizerOptions(), EwcRegularizerOptions(), KlRegularizerOptions()]) == frozenset({PRESERVE_DATA})


def test_kl_cached_reference_top_k_plus_tail_by_hand():
    """calibrate_extra caches the base's top-3 tempered log-probs; the loss is KL over those 3 classes plus
    one tail bucket, lambda T^2 times its mean over real positions (float64 reference from an untouched copy)."""
    regularizer, model, tokenizer = kl_setup(reference="cached", temperature=2.0, strength=0.5)
    base = copy.deepcopy(model)
    recipe = SimpleNamespace(data=SimpleNamespace(max_length=5), calibration=SimpleNamespace(kl_topk=3, stats_batch_size=2))
    cache = KlRegularizer.calibrate_extra(model, tokenizer, TEXTS, recipe, regularizer.options)
    assert set(cache) == {"ids", "lengths", "top_ids", "top_logp0", "temperature"} and float(cache["temperature"]) == 2.0
    assert cache["lengths"].tolist() == [4, 3, 5, 1, 2] and cache["top_ids"].shape == (5, 5, 3)
    regularizer.ctx.calibration.extra = lambda name: cache if name == "kl" else None
    regularizer.attach(model, SimpleNamespace())
    assert float(regularizer.extra_loss(model, {}, None).detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        model.get_submodule(TRAINED).weight.add_(0.3)
    index, ids, mask = regularizer.preserve_batch()
    regularizer.batches.draws -= 1
    loss = regularizer.extra_loss(model, {}, None)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.double() / 2.0, -1)
        p0 = torch.softmax(base(input_ids=ids, attention_mask=mask).logits.double() / 2.0, -1)
    top = p0.topk(3, dim=-1).indices
    q0, q = p0.gather(-1, top), p.gather(-1, top)
    head = (q0 * (q0.log() - q.log())).sum(-1)
    t0, t = 1 - q0.sum(-1), 1 - q.sum(-1)
    per_position = head + t0 * (t0.log() - t.log())
    expected = 0.5 * 4.0 * float((per_position * mask).sum() / mask.sum())
    assert expected > 1e-4 and float(loss.detach()) == pytest.approx(expected, rel=2e-3)


def test_kl_frozen_reference_uses_the_adapter_switch_or_the_methods_theta0():
    import contextlib

    regularizer, model, _ = kl_setup()
    switched = []

    @contextlib.contextmanager
    def disable_adapter():
        switched.append(True)
        yield

    model.disable_adapter = disable_adapter  # as PEFT models have: the base is the model with the adapter off
    regularizer.attach(model, SimpleNamespace())
    assert not hasattr(regularizer, "theta0")
    assert float(regularizer.extra_loss(model, {}, None).detach()) == pytest.approx(0.0, abs=1e-6) and switched == [True]
    own, plain, _ = kl_setup()
    kept = {f"{TRAINED}.weight": plain.get_submodule(TRAINED).weight.detach().clone()}
    own.attach(plain, SimpleNamespace(theta0=kept))
    assert own.theta0 is kept  # the method's theta_0, not a second copy
