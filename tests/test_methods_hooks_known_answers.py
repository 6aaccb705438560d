"""Known answers for the per-step hooks and state of FoLoRA and FORA, without a training run.

The methods are built on two tiny layers with hand-set bases, so each hook's effect (which gate, which
step refreshes, which keys a checkpoint holds, which error a stale checkpoint raises) can be checked
against values written here (issue 13's mutation run).
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from preserve_core.calibration.gram import UpperGram
from torch import nn

from preserve_core.errors import PPFTError
from preserve_core.methods.base import PRESERVE_STATS
from preserve_core.methods.folora.gated_adam import GatedAdamW
from preserve_core.methods.folora.layer import FoloraLinear
from preserve_core.methods.folora.method import Folora, FoloraOptions
from preserve_core.methods.fora.bases import ForaBases, RightProjector
from preserve_core.methods.fora.layer import ForaLinear
from preserve_core.methods.fora.method import BASES_HASH, Fora, ForaOptions

CPU = torch.device("cpu")
VECTORS = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 4.0]])
VALUES = torch.tensor([8.0, 4.0, 2.0, 0.0], dtype=torch.float64)


def folora(max_steps: int = 10, **options) -> Folora:
    """FoLoRA on three layers: "q" and "k" read input "x", "o" reads input "y"; V = diag(1, 2, 0.5, 4)."""
    recipe = SimpleNamespace(training=SimpleNamespace(max_steps=max_steps), calibration=SimpleNamespace(task_positions="all"))
    method = Folora(FoloraOptions(r=2, alpha=4.0, **options), SimpleNamespace(recipe=recipe, device=CPU))
    shared = VECTORS.clone()
    for name, key in (("q", "x"), ("k", "x"), ("o", "y")):
        torch.manual_seed(len(name) + ord(name))
        method.wrappers[name] = FoloraLinear(nn.Linear(4, 3), shared if key == "x" else VECTORS.clone(), 2, 4.0, 0.0, 0.1)
        method.names_by_key.setdefault(key, []).append(name)
    for key in ("x", "y"):
        method.values[key] = VALUES.clone()
        method.step_scales[key] = method._step_scale(method.wrappers[method.names_by_key[key][0]].basis)
    return method


def test_step_scale_is_one_or_the_inverse_column_length():
    assert torch.equal(folora()._step_scale(VECTORS), torch.ones(4))
    euclidean = folora(step="euclidean")._step_scale(torch.cat([VECTORS, torch.zeros(4, 1)], 1))
    assert euclidean.dtype == torch.float32
    torch.testing.assert_close(euclidean[:4], torch.tensor([1.0, 0.5, 2.0, 0.25]), atol=0, rtol=0)
    assert euclidean[4].item() == pytest.approx(1e30, rel=1e-6)  # a zero column: clamped, not inf


def test_gate_follows_the_quantile_schedule_and_records_gamma():
    method = folora(max_steps=10, gamma_schedule="linear", gamma_quantile_start=0.0, gamma_quantile=1.0)
    method.step = 5  # quantile 0.5 of (0, 2, 4, 8): gamma 3
    torch.testing.assert_close(method._gate("x"), torch.tensor([8 / 11, 4 / 7, 2 / 5, 0.0]))
    assert method.gammas == {"x": 3.0}
    hard = folora(gate="hard", hard_k=0.75)  # 3 of K = 4, though only 2 reach gamma = 3
    assert hard._gate("y").tolist() == [1.0, 1.0, 1.0, 0.0] and hard.gammas["y"] == 3.0
    assert folora(gate="hard", gamma_quantile=0.75)._gate("y").tolist() == [1.0, 0.0, 0.0, 0.0]  # gamma 5
    sharp = folora(gate="temperature", temperature=0.5)._gate("x")  # l^2 / (l^2 + 9)
    torch.testing.assert_close(sharp, torch.tensor([64 / 73, 16 / 25, 4 / 13, 0.0]))


def test_a_hard_gate_opens_over_training_when_the_schedule_runs_from_a_high_quantile_to_a_low_one():
    """lambda (8, 4, 2, 0), quantile .75 -> .25 over 10 steps (torch.quantile interpolates the sorted values at
    q * 3): step 0, q .75, gamma 4 + .25 * 4 = 5, one direction open; step 5, q .5, gamma 3, two; step 10,
    q .25, gamma 1.5, three (lambda 0 stays closed)."""
    method = folora(max_steps=10, gate="hard", gamma_schedule="linear", gamma_quantile_start=0.75, gamma_quantile=0.25)
    opened = {}
    for step in (0, 5, 10):
        method.step = step
        opened[step] = (method._gate("x").tolist(), method.gammas["x"])
    assert opened[0] == ([1.0, 0.0, 0.0, 0.0], pytest.approx(5.0))
    assert opened[5] == ([1.0, 1.0, 0.0, 0.0], pytest.approx(3.0))
    assert opened[10] == ([1.0, 1.0, 1.0, 0.0], pytest.approx(1.5))


def test_set_gates_gives_every_layer_of_an_input_its_gate_times_the_step_scale():
    method = folora(step="euclidean")
    method.step_scales = {key: method._step_scale(VECTORS) for key in ("x", "y")}
    params = [w.lora_A_tilde for w in method.wrappers.values()]
    optimizer = GatedAdamW(params, lr=0.1)
    method._set_gates(SimpleNamespace(optimizer=optimizer))  # through an Accelerate-like wrapper
    expected = torch.tensor([8 / 11, 4 / 7 * 0.5, 2 / 5 * 2, 0.0])  # median of (0, 2, 4, 8) = 3
    for w in method.wrappers.values():
        torch.testing.assert_close(optimizer.gate(w.lora_A_tilde), expected)


def test_after_step_refreshes_on_multiples_of_refresh_every_before_the_last_step():
    method = folora(max_steps=8, refresh_every=3, refresh_window=2)
    refreshed, gated = [], []
    method.refresh = lambda optimizer, model=None: refreshed.append((method.step, optimizer))
    method._set_gates = lambda optimizer: gated.append((method.step, optimizer))
    optimizer = GatedAdamW([nn.Parameter(torch.zeros(1))], lr=0.1)
    windows = {}
    wrapped = SimpleNamespace(optimizer=optimizer)
    for step in range(1, 9):
        method.after_step(None, wrapped, step)
        windows[step] = method.window_open
    assert [s for s, _ in refreshed] == [3, 6] and all(o is optimizer for _, o in refreshed)  # not 9 > 8, unwrapped
    assert gated == [(s, wrapped) for s in range(1, 9)] and method.step == 8
    assert [s for s, w in windows.items() if w] == [1, 2, 4, 5, 7, 8]  # the next step s + 1 is in a window: 2-3, 5-6, 8-9
    never = folora(max_steps=6, refresh_every=3)
    never.refresh = lambda optimizer, model=None: refreshed.append(("never", optimizer))
    never._set_gates = lambda optimizer: None
    never.after_step(None, optimizer, 6)  # the last step: nothing after it to refresh for
    assert refreshed[-1][0] == 6 and len(refreshed) == 2


def test_recording_hooks_arm_the_layers_and_extra_loss_feeds_the_window():
    method = folora(refresh_every=2, refresh_window=1)
    method.step = 1  # step 2 ends at a refresh: inside the window
    method._set_recording()
    assert method.window_open is True
    method._arm_recording(None, ())
    assert all(w.record_inputs for w in method.wrappers.values())
    x_in, y_in = torch.ones(1, 2, 4), torch.full((1, 2, 4), 2.0)
    method.wrappers["q"].last_input, method.wrappers["k"].last_input = x_in, torch.zeros(1, 2, 4)
    method.wrappers["o"].last_input = y_in
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    assert method.extra_loss(None, batch, None) is None
    assert all(w.last_input is None and w.record_inputs is False for w in method.wrappers.values())
    method.extra_loss(None, batch, None)  # nothing recorded: the window is unchanged
    assert float(method.window.counts["x"]) == 2
    estimates = dict(method.window.pop_estimates())
    torch.testing.assert_close(estimates["x"], torch.ones(4, 4))  # the first layer of "x": q
    torch.testing.assert_close(estimates["y"], torch.full((4, 4), 4.0))
    assert method.window.sums == {} and method.window.counts == {}
    method.step = 2
    method._set_recording()
    assert method.window_open is False


def test_state_dict_round_trip():
    method = folora()
    method.step, method.gammas = 7, {"x": 1.5}
    method.rebased = {"y"}
    method.task_covs = {"x": torch.eye(4)}
    method.window.sums["x"] = UpperGram.from_full(torch.ones(4, 4))
    method.window.counts["x"] = torch.tensor(3.0, dtype=torch.float64)
    state = method.state_dict()
    assert set(state) == {"step", "basis/y", "values/x", "values/y", "gamma/x", "gamma/y", "task_cov/x",
                          "window_block/x/0", "window_count/x"}  # fmt: skip
    assert state["step"].dtype == torch.int64 and int(state["step"]) == 7
    assert state["gamma/x"].dtype == torch.float64 and float(state["gamma/x"]) == 1.5 and math.isnan(float(state["gamma/y"]))
    assert state["basis/y"] is method.wrappers["o"].basis
    other = folora(step="euclidean")
    new_basis = VECTORS * 2
    other.load_state_dict({**state, "basis/y": new_basis, "values/y": VALUES + 1})
    assert other.step == 7 and other.rebased == {"y"} and other.gammas["x"] == 1.5
    torch.testing.assert_close(other.wrappers["o"].basis, new_basis, atol=0, rtol=0)
    torch.testing.assert_close(other.wrappers["q"].basis, VECTORS, atol=0, rtol=0)  # not re-based: kept
    torch.testing.assert_close(other.values["y"], VALUES + 1, atol=0, rtol=0)
    torch.testing.assert_close(other.step_scales["y"], torch.tensor([0.5, 0.25, 1.0, 0.125]))  # from the loaded basis
    torch.testing.assert_close(other.task_covs["x"], torch.eye(4), atol=0, rtol=0)
    assert set(other.task_covs) == {"x"} and float(other.window.counts["x"]) == 3


def test_lora_factors_and_weight_deltas():
    method = folora()
    for w in method.wrappers.values():
        with torch.no_grad():
            w.lora_B.fill_(0.5)
    factors = method.lora_factors()
    deltas = method.weight_deltas()
    assert set(deltas) == {"q.weight", "k.weight", "o.weight"}
    for name, (a, b) in factors.items():
        w = method.wrappers[name]
        torch.testing.assert_close(a, w.lora_A_tilde.detach() @ VECTORS.T)
        torch.testing.assert_close(b, torch.full((3, 2), 1.0))  # (alpha / r) B
        torch.testing.assert_close(deltas[f"{name}.weight"], b @ a)
    assert method.track_weight_deltas() is None


# -- FORA ---------------------------------------------------------------------------------------


def fora(form: str = "lora", **options) -> Fora:
    calibration = SimpleNamespace(input_key=lambda name: {"q": "x", "k": "x", "o": "y"}[name])
    ctx = SimpleNamespace(recipe=SimpleNamespace(training=SimpleNamespace(max_steps=10)), device=CPU, calibration=calibration)
    method = Fora(ForaOptions(form=form, **options), ctx)
    shared = RightProjector(torch.eye(4)[:, :1])
    for name in ("q", "k", "o"):
        right = shared if name != "o" else RightProjector(torch.eye(4)[:, :3], complement=True)
        bases = ForaBases(right, torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(4, 0))
        method.layers[name] = ForaLinear(nn.Linear(4, 3), bases, r=2 if form == "lora" else 0)
    return method


def test_fora_needs_and_adapter_flag():
    assert Fora.needs_for(ForaOptions()) == frozenset({PRESERVE_STATS})
    assert Fora.needs_for(ForaOptions(source="weight")) == frozenset()
    assert fora("lora").is_adapter is True and fora("full").is_adapter is False


def test_fora_after_step_refreshes_on_multiples_before_the_last_step():
    method = fora("full", refresh_every=4)
    calls = []
    method.ctx.recipe.training.max_steps = 8
    method.refresh_q = lambda model: calls.append(model)
    for step in range(1, 9):
        method.after_step(f"model@{step}", None, step)
    assert calls == ["model@4"]  # not after the last step (8)
    idle = fora("full")
    idle.refresh_q = lambda model: calls.append(model)
    idle.after_step("x", None, 4)
    assert len(calls) == 1


def test_fora_bases_digest_is_cached_and_sees_names_shapes_and_sharing():
    method = fora()
    first = method.bases_digest()
    assert isinstance(first, bytes) and len(first) == 32
    method.layers["q"].u1 = torch.ones(3, 1)  # after the first call the digest is cached
    assert method.bases_digest() == first
    unshared = fora()
    unshared.layers["k"].right = unshared.layers["k"].right.clone()  # equal values, but no longer one tensor
    assert unshared.bases_digest() != first
    flipped = fora()
    flipped.layers["o"].q_complement = False
    assert flipped.bases_digest() != first
    renamed = fora()
    renamed.layers = {("p" if n == "q" else n): layer for n, layer in renamed.layers.items()}
    assert renamed.bases_digest() != first


def test_fora_state_round_trip_and_stale_checkpoints():
    method = fora("full")
    state = method.state_dict()
    assert set(state) == {BASES_HASH} and state[BASES_HASH].dtype == torch.uint8
    assert bytes(state[BASES_HASH].tolist()) == method.bases_digest()
    method.refreshed = {"y": RightProjector(torch.eye(4)[:, 2:], complement=True)}
    state = method.state_dict()
    assert set(state) == {BASES_HASH, "refreshed/y", "refreshed_complement/y"}
    assert bool(state["refreshed_complement/y"]) is True
    resumed = fora("full")
    resumed.optimizer = SimpleNamespace(calls=[])
    resumed.optimizer.set_projector = lambda p, right, u1: resumed.optimizer.calls.append((p, right.vectors, u1))
    resumed.load_state_dict(state)
    assert set(resumed.refreshed) == {"y"} and resumed.refreshed["y"].complement is True
    layer = resumed.layers["o"]
    torch.testing.assert_close(layer.right, torch.eye(4)[:, 2:], atol=0, rtol=0)
    assert layer.q_complement is True and resumed.layers["q"].right.shape == (4, 1)  # "x" not refreshed
    assert [(p is layer.base.weight, u1 is layer.u1) for p, _, u1 in resumed.optimizer.calls] == [(True, True)]
    old = "this FORA checkpoint has no bases hash (made by an older ppft); resume is not possible"
    with pytest.raises(PPFTError, match=f"^{re.escape(old)}$"):
        fora("full").load_state_dict({})
    stale = {BASES_HASH: torch.zeros(32, dtype=torch.uint8)}
    changed = ("FORA's bases recomputed from the calibration differ from those the checkpoint was trained with (the "
               "calibration, the method options or the numerics changed). Restore that calibration, or start the run "
               "afresh (without --resume).")  # fmt: skip
    with pytest.raises(PPFTError, match=f"^{re.escape(changed)}$"):
        fora("full").load_state_dict(stale)


# -- the Method defaults ------------------------------------------------------------------------


def test_method_defaults():
    from preserve_core.methods.base import Method, unwrap_model
    from preserve_core.methods.kl import Kl
    from preserve_core.methods.lora import Lora

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    method = Method(SimpleNamespace(), SimpleNamespace())
    groups = method.parameter_groups(model, 0.25)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.25
    assert [p is q for p, q in zip(groups[0]["params"], model[1].parameters(), strict=True)] == [True, True]
    training = SimpleNamespace(decay=0.1, lr=0.02, adam_betas=(0.8, 0.9), adam_eps=1e-5)
    optimizer = method.build_optimizer(model, training)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.02, (0.8, 0.9), 1e-5, 0.1)
    state = method.trainable_state(model)
    assert set(state) == {"1.weight", "1.bias"} and not state["1.weight"].requires_grad
    method.load_trainable_state(model, {"1.bias": torch.tensor([5.0])})
    assert model[1].bias.item() == 5.0
    with pytest.raises(KeyError, match=r"checkpoint has parameters the model lacks: \['2.weight'\]"):
        method.load_trainable_state(model, {"2.weight": torch.zeros(1)})
    for hook in (method.track_weight_deltas, method.weight_deltas):
        method.name = "plain"
        with pytest.raises(NotImplementedError, match="^method plain does not expose its weight change$"):
            hook()
    method.weight_deltas = lambda: {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    assert method.delta_names() == ["a", "b"] and float(method.weight_delta_sq_norm()) == 14.0
    assert Method.has_calibration_extra(SimpleNamespace()) is False and Lora.has_calibration_extra(SimpleNamespace()) is False
    assert Kl.has_calibration_extra(Kl.Options()) is True  # the top-k cache is written for either reference

    class Cached(Method):
        @classmethod
        def calibrate_extra(cls, model, tokenizer, preserve_texts, recipe):
            return {"x": torch.ones(1)}

    assert Cached.has_calibration_extra(SimpleNamespace()) is True and Method.calibrate_extra(None, None, [], None) == {}
    ddp_like = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp_like)
    ddp_like.module = model
    assert unwrap_model(ddp_like) is model and unwrap_model(model) is model


# -- FORA's refresh of Q ------------------------------------------------------------------------


def _refresh_case():
    from conftest import build_tiny_llama

    model = build_tiny_llama(40, layers=1).train()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    batches = [{"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj",
             "model.layers.0.mlp.down_proj"]  # fmt: skip
    return model, batches, names


def test_fora_refresh_measures_the_current_model_in_eval_mode_and_solves_once_per_input():
    from preserve_core.methods.fora.refresh import current_projectors

    model, batches, names = _refresh_case()
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].detach())))
    options = SimpleNamespace(energy=0.5, rank=None, max_rank=0.9)
    projectors = current_projectors(model, names, batches, options, CPU)
    assert model.training is True and seen[0][0] is False  # measured in eval mode, restored after
    seen.clear()
    with torch.no_grad():
        model.eval()(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    x = seen[0][1][batches[0]["attention_mask"].bool()].double()  # the 7 real positions
    cov = x.T @ x / 7
    assert projectors[names[0]] is projectors[names[1]] and projectors[names[2]] is not projectors[names[0]]
    values, vectors = torch.linalg.eigh(cov)
    share = values.flip(0).cumsum(0) / values.sum()
    k = int((share < 0.5).sum()) + 1
    assert projectors[names[0]].rank == k
    top = vectors.flip(1)[:, :k]
    torch.testing.assert_close(projectors[names[0]].protected().double() @ projectors[names[0]].protected().double().T,
                               top @ top.T, atol=1e-4, rtol=0)  # fmt: skip


def test_fora_refresh_holds_one_covariance_at_a_time_and_a_budget_changes_nothing(monkeypatch):
    """Each input's C_p is solved and dropped before the next is built; with a budget of one input's sums
    per pass (three passes over the batches) the projectors are bit-identical to one pass."""
    import weakref

    from preserve_core.methods.fora import refresh

    model, batches, names = _refresh_case()
    options = SimpleNamespace(energy=0.9, rank=None, max_rank=0.9)
    alive, solve = [], refresh.input_projector

    def watched(cov, opts):
        alive.append(sum(ref() is not None for ref in refs))
        refs.append(weakref.ref(cov))
        return solve(cov, opts)

    refs: list = []
    monkeypatch.setattr(refresh, "input_projector", watched)
    one_pass = refresh.current_projectors(model, names, batches, options, CPU)
    assert alive == [0, 0, 0]  # three distinct inputs, none of the earlier matrices alive at the next solve
    from preserve_core.calibration import stats

    passes = []
    real_passes = stats.input_stats_passes

    def counted(*args, **kwargs):
        for part in real_passes(*args, **kwargs):
            passes.append(sorted(part.sums))
            yield part

    monkeypatch.setattr(stats, "input_stats_passes", counted)
    split = refresh.current_projectors(model, names, batches, options, CPU, budget_bytes=1)
    assert len(passes) == 3 and all(len(keys) == 1 for keys in passes)
    for name in names:
        assert torch.equal(one_pass[name].vectors, split[name].vectors)
        assert one_pass[name].complement == split[name].complement
