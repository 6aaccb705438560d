"""FoLoRA: the generalized eigenbasis, gated Adam, the forgetting/learning trade-off, resume, export, refresh."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_final_adapter, rewind_to_previous_checkpoint
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from preserve_core.checkpoint import list_checkpoints
from preserve_core.methods.folora import Folora
from preserve_core.methods.folora.basis import damped_preserve, gamma_of, gate_values, generalized_basis, resolve_keep
from preserve_core.methods.folora.layer import FoloraLinear, default_init_std
from preserve_core.methods.folora.gated_adam import GatedAdamW
from preserve_core.recipe import load_recipe
from preserve_core.training import train

FAST_CALIBRATION = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 10, "min_new_tokens": 1, "stats_batch_size": 8}


def covariances(n: int = 16, seed: int = 0, samples: int = 512):
    """Preserve inputs concentrated on 8 of 16 directions, task inputs mostly on the other 8 (rotated)."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()
    half = n // 2
    scale_p = torch.cat([torch.ones(half), torch.full((n - half,), 0.01)]).sqrt()
    scale_t = torch.cat([torch.full((half,), 0.2), torch.ones(n - half)]).sqrt()
    x_p = (torch.randn(samples, n, generator=g) * scale_p) @ rot.T
    x_t = (torch.randn(samples, n, generator=g) * scale_t) @ rot.T
    return x_p, x_t, x_p.T @ x_p / samples, x_t.T @ x_t / samples


def test_damped_preserve_by_hand():
    """eps = damping * tr(C_p) / n: diag(2, 4) has tr/n = 3, so damping 0.5 adds 1.5 (not 0.5)."""
    m = damped_preserve(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), 0.5)
    torch.testing.assert_close(m, torch.tensor([[3.5, 1.0], [1.0, 5.5]], dtype=torch.float64), atol=0, rtol=0)
    torch.testing.assert_close(damped_preserve(torch.zeros(2, 2), 0.25), 0.25 * torch.eye(2, dtype=torch.float64))


def test_basis_solves_the_generalized_problem():
    """Against M = C_p + eps I built here from the definition (eps = damping tr(C_p) / n, tr/n ~ 0.5 here)."""
    _, _, c_p, c_t = covariances()
    c_p64 = c_p.double()
    m = (c_p64 + c_p64.T) / 2 + 1e-4 * float(torch.trace(c_p64)) / 16 * torch.eye(16, dtype=torch.float64)
    reference = torch.linalg.eigvals(torch.linalg.solve(m, c_t.double())).real.sort(descending=True).values
    basis = generalized_basis(c_t, c_p, 1e-4, keep=16)
    v, lam = basis.vectors, basis.values
    torch.testing.assert_close(v.T @ m @ v, torch.eye(16, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(c_t.double() @ v, m @ v @ torch.diag(lam), atol=1e-9, rtol=0)
    assert torch.all(lam[:-1] >= lam[1:]) and lam[0] > 10 * lam[-1]
    torch.testing.assert_close(lam, reference, atol=1e-8, rtol=1e-8)  # eigenvalues of M^-1 C_t, another route
    top = generalized_basis(c_t, c_p, 1e-4, keep=resolve_keep(0.25, 16))
    assert top.vectors.shape == (16, 4)
    torch.testing.assert_close(top.values, lam[:4])


def test_gates():
    lam = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    gamma = gamma_of(lam, 0.5)
    assert gamma == 2.0
    soft = gate_values(lam, gamma, "soft")
    torch.testing.assert_close(soft, torch.tensor([0.8, 2 / 3, 0.5, 1 / 3, 0.0]))
    torch.testing.assert_close(gate_values(lam, gamma, "temperature", temperature=1.0), soft)
    sharp = gate_values(lam, gamma, "temperature", temperature=0.05)
    assert torch.all(sharp[:2] > 0.99) and torch.all(sharp[3:] < 0.01)
    assert gate_values(lam, gamma, "hard").tolist() == [1, 1, 1, 0, 0]
    assert gate_values(lam, gamma, "hard", hard_k=2).tolist() == [1, 1, 0, 0, 0]


def test_gated_adam_is_adamw_without_gates_and_freezes_closed_columns():
    torch.manual_seed(0)
    p = torch.randn(3, 5, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    gated = GatedAdamW([p], lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    for _ in range(5):
        grad = torch.randn(3, 5)
        p.grad, q.grad = grad.clone(), grad.clone()
        gated.step()
        plain.step()
    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    before = p.detach().clone()
    gated.set_gate(p, torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0]))
    for _ in range(3):
        p.grad = torch.randn(3, 5)
        gated.step()
    moved = (p.detach() - before).abs().sum(0)
    assert moved[1] == 0 and moved[3] == 0 and torch.all(moved[[0, 2, 4]] > 0)


def train_toy(quantile: float, gate: str, init_gated: bool, steps: int = 200):
    """Fit ``y = (W0 + D) x`` on task inputs with a FoLoRA layer; returns (initial loss, final loss, penalty)."""
    x_p, x_t, c_p, c_t = covariances()
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(16, 8, bias=False).requires_grad_(False)
    base.weight.copy_(torch.randn(8, 16, generator=g))
    y_t = x_t @ (base.weight + torch.randn(8, 16, generator=g)).T
    basis = generalized_basis(c_t, c_p, 1e-4, keep=16)
    torch.manual_seed(0)
    layer = FoloraLinear(base, basis.vectors, 4, 8.0, 0.0, default_init_std(float(torch.trace(c_p)), 16, 16))
    gates = gate_values(basis.values, gamma_of(basis.values, quantile), gate)
    if init_gated:
        layer.lora_A_tilde.data.mul_(gates)
    optimizer = GatedAdamW([layer.lora_A_tilde, layer.lora_B], lr=1e-2)
    optimizer.set_gate(layer.lora_A_tilde, gates)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((layer(x_t) - y_t) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    dw = layer.delta_weight().detach()
    return losses[0], losses[-1], float(torch.trace(dw @ c_p @ dw.T))


def test_penalty_falls_as_the_gate_tightens_while_the_task_is_learned():
    loose, medium = train_toy(0.0, "soft", False), train_toy(0.5, "soft", False)
    assert medium[2] < 0.2 * loose[2], (loose, medium)
    runs = [train_toy(q, "hard", True) for q in (0.0, 0.25, 0.5, 0.75)]
    penalties = [r[2] for r in runs]
    assert all(a > b for a, b in zip(penalties, penalties[1:], strict=False)), runs
    assert all(final < 0.6 * first for first, final, _ in runs + [loose, medium]), runs


def test_closed_directions_never_change_a():
    """With gates 0 outside S, ``A - A0 = (A~ - A~0) V^T`` and only the columns in S of ``A~`` move."""
    _, x_t, c_p, c_t = covariances()
    basis = generalized_basis(c_t, c_p, 1e-4, keep=16)
    layer = FoloraLinear(nn.Linear(16, 8, bias=False).requires_grad_(False), basis.vectors, 4, 8.0, 0.0, 0.1)
    a0 = layer.lora_A().detach().clone()
    optimizer = GatedAdamW([layer.lora_A_tilde, layer.lora_B], lr=1e-2)
    optimizer.set_gate(layer.lora_A_tilde, gate_values(basis.values, 0.0, "hard", hard_k=5))
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x_t) ** 2).mean().neg().backward()
        optimizer.step()
    coords = (layer.lora_A().detach() - a0).double() @ damped_preserve(c_p, 1e-4) @ basis.vectors  # = A~ - A~0
    assert coords[:, :5].abs().max() > 1e-3
    assert coords[:, 5:].abs().max() < 1e-5


# -- engine level -------------------------------------------------------------------------------


def run(path, *overrides, resume=False):
    return train(load_recipe(path, list(overrides)), resume=resume, show_progress=False)


def folora_recipe(write_recipe, name: str, method: dict | None = None, **sections):
    method = {"name": "folora", "r": 4, "alpha": 8, **(method or {})}
    return write_recipe(name, method=method, **{"calibration": FAST_CALIBRATION, **sections})


def test_resume_is_exact_with_schedule_and_refresh(write_recipe):
    method = {"gamma_schedule": "linear", "gamma_quantile_start": 0.1, "refresh_every": 3, "refresh_window": 2}
    common = {"max_steps": 8, "save_every": 4, "keep_last": 5, "lr": 2e-2, "warmup_steps": 2, "grad_accum": 2}
    straight = run(folora_recipe(write_recipe, "straight", method, training=common))
    at_4, at_8 = (load_file(c / "method.safetensors") for c in list_checkpoints(straight.run_dir))
    bases = [k for k in at_4 if k.startswith("basis/")]
    assert bases and all(not torch.allclose(at_4[k], at_8[k]) for k in bases), "the refresh at step 6 changed nothing"
    interrupted = folora_recipe(write_recipe, "resumed", method, training=common)
    first = run(interrupted)
    resume_from = rewind_to_previous_checkpoint(first.run_dir)
    assert resume_from.name == "checkpoint-000004"
    assert load_file(resume_from / "method.safetensors").keys() >= {"step"}
    run(interrupted, resume=True)
    assert_same_final_adapter(straight.run_dir, first.run_dir, atol=1e-6)


def test_resume_is_exact_mid_window_with_balanced_task_positions(write_recipe):
    """task_positions: balanced; the checkpoint at step 5 falls inside the window of the refresh at step 6, so it
    carries both halves of the window (loss and all positions), and resuming from it ends where a straight run does."""
    method = {"refresh_every": 3, "refresh_window": 2}
    common = {"max_steps": 8, "save_every": 5, "keep_last": 5, "lr": 2e-2, "warmup_steps": 1}
    calibration = {**FAST_CALIBRATION, "task_positions": "balanced"}
    straight = run(folora_recipe(write_recipe, "straight-bal", method, calibration=calibration, training=common))
    interrupted = folora_recipe(write_recipe, "resumed-bal", method, calibration=calibration, training=common)
    first = run(interrupted)
    resume_from = rewind_to_previous_checkpoint(first.run_dir)
    assert resume_from.name == "checkpoint-000005"
    state = load_file(resume_from / "method.safetensors")
    assert any(k.endswith("@loss") for k in state if k.startswith("window_count/"))
    assert any(k.endswith("@all") for k in state if k.startswith("window_count/"))
    run(interrupted, resume=True)
    assert_same_final_adapter(straight.run_dir, first.run_dir, atol=1e-6)


def test_resume_is_exact_without_bases_in_the_checkpoint(write_recipe):
    """No refresh: the checkpoint holds no V_K (recomputed from calibration at set-up), resume is still exact."""
    common = {"max_steps": 6, "save_every": 3, "keep_last": 5, "lr": 2e-2, "warmup_steps": 1}
    straight = run(folora_recipe(write_recipe, "straight-nobasis", training=common))
    interrupted = folora_recipe(write_recipe, "resumed-nobasis", training=common)
    first = run(interrupted)
    saved = load_file(rewind_to_previous_checkpoint(first.run_dir) / "method.safetensors")
    assert saved and not [k for k in saved if k.startswith("basis/")]
    resumed = run(interrupted, resume=True)
    assert_same_final_adapter(straight.run_dir, first.run_dir, atol=0)
    wrappers = resumed.model.get_submodule("model.layers.0.self_attn")
    assert len({getattr(wrappers, f"{p}_proj").basis.data_ptr() for p in "qkv"}) == 1  # one V_K per input
    assert wrappers.q_proj.basis.dtype == torch.float32


def test_export_reproduces_logits_with_stock_peft_and_merged(write_recipe, tiny_model_dir):
    result = run(folora_recipe(write_recipe, "export", training={"max_steps": 6, "lr": 5e-2}, output={"merge": True}))
    ids = torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        before = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, result.final_dir).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged").eval()(input_ids=ids).logits
        with result.model.disable_adapter():
            torch.testing.assert_close(result.model(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    assert not torch.allclose(before, expected, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_refresh_with_unchanged_task_statistics_is_a_no_op(write_recipe, monkeypatch):
    """A refresh from the calibration's own C_t gives the same V: the trajectory equals the run without refresh."""
    common = {"max_steps": 6, "lr": 2e-2, "schedule": "constant"}
    plain = run(folora_recipe(write_recipe, "plain", training=common))
    refreshed_keys = []

    def refresh_from_calibration(self, optimizer, model=None):
        for key in self.names_by_key:
            self.rebase(key, self.ctx.calibration.cov_by_key("task", key), optimizer)
            refreshed_keys.append(key)

    monkeypatch.setattr(Folora, "refresh", refresh_from_calibration)
    refreshed = run(folora_recipe(write_recipe, "refreshed", {"refresh_every": 2}, training=common))
    assert refreshed_keys
    a = load_file(list_checkpoints(plain.run_dir)[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(refreshed.run_dir)[-1] / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # V is stored in float32: T = V^T M V is I to ~1e-6, which Adam's eps regime amplifies a little
        torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=1e-3)


def test_refresh_keeps_the_adapter_and_rotates_moments(write_recipe, monkeypatch):
    """A refresh from a different C_t changes V but, with K = n, leaves every ``A = A~ V^T`` as it was,
    and moves the first moment exactly: ``m_new V_new^T = m_old V_old^T`` (both the gradient in A-space)."""
    checked = []

    def refresh_to_other(self, optimizer, model=None):
        for key, names in self.names_by_key.items():
            wrapper = self.wrappers[names[0]]
            a_before, basis_before = wrapper.lora_A().detach().clone(), wrapper.basis.clone()
            m_before = optimizer.state[wrapper.lora_A_tilde]["exp_avg"].clone() @ basis_before.T
            v_before = optimizer.state[wrapper.lora_A_tilde]["exp_avg_sq"].sum(-1)
            cal = self.ctx.calibration
            other = cal.cov_by_key("task", key) + 0.3 * cal.cov_by_key("preserve", key)
            self.rebase(key, other, optimizer)
            assert not torch.allclose(wrapper.basis, basis_before, atol=1e-3)
            torch.testing.assert_close(wrapper.lora_A(), a_before, atol=1e-5, rtol=1e-4)
            m_after = optimizer.state[wrapper.lora_A_tilde]["exp_avg"] @ wrapper.basis.T
            torch.testing.assert_close(m_after, m_before, atol=1e-6, rtol=1e-4)
            v_after = optimizer.state[wrapper.lora_A_tilde]["exp_avg_sq"].sum(-1)
            torch.testing.assert_close(v_after, v_before, atol=1e-9, rtol=1e-4)
            checked.append(key)

    monkeypatch.setattr(Folora, "refresh", refresh_to_other)
    result = run(folora_recipe(write_recipe, "other", {"refresh_every": 2}, training={"max_steps": 4, "lr": 2e-2}))
    assert checked and all(torch.isfinite(torch.tensor([m["loss"] for m in result.metrics if "loss" in m])))


def test_refresh_preserve_rebases_on_c_p_measured_by_hand_on_the_model_being_trained(write_recipe, monkeypatch):
    """refresh_preserve: at the step-2 refresh, the C_p handed to ``rebase`` equals x^T x / N over the layer
    inputs of the first 4 calibration preserve sequences run through the model as it is then (float64, by
    hook), the new V solves ``C_t v = lambda (C_p + eps I) v`` for that C_p (scipy), and ``A = A~ V^T`` is
    unchanged (K = n). The same measurement with the adapter off differs by more than the tolerance.""" 
    import numpy as np
    import scipy.linalg

    from preserve_core.calibration.batches import preserve_batches

    seen, original_refresh, original_rebase = {}, Folora.refresh, Folora.rebase

    def by_hand(method, model):
        tokenizer, cal = method.ctx.tokenizer, method.ctx.calibration
        batches = preserve_batches(cal.preserve_sequences(tokenizer, 32)[:4], tokenizer, 32, 8)
        first = {key: names[0] for key, names in method.names_by_key.items()}
        inputs, mask = {key: [] for key in first}, {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, k=k: inputs[k].append(a[0][mask["m"]]))
                 for k, n in first.items()]  # fmt: skip
        was_open, method.window_open = method.window_open, False
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        model.train()
        method.window_open = was_open
        for h in hooks:
            h.remove()
        return {k: (lambda x: x.T @ x / x.shape[0])(torch.cat(v).double()) for k, v in inputs.items()}

    def refresh(self, optimizer, model=None):
        seen["hand"] = by_hand(self, model)
        with model.disable_adapter():
            seen["base"] = by_hand(self, model)
        seen["a"] = {n: w.lora_A().detach().clone() for n, w in self.wrappers.items()}
        seen["rebased"], seen["method"] = {}, self
        original_refresh(self, optimizer, model)
        for name, w in self.wrappers.items():  # K = n: the rebase moved no update
            torch.testing.assert_close(w.lora_A(), seen["a"][name], atol=1e-5, rtol=1e-4)

    def rebase(self, key, c_t, optimizer, c_p=None):
        seen["rebased"][key] = (c_t.double().cpu(), None if c_p is None else c_p.double().cpu())
        original_rebase(self, key, c_t, optimizer, c_p)

    monkeypatch.setattr(Folora, "refresh", refresh)
    monkeypatch.setattr(Folora, "rebase", rebase)
    method = {"refresh_every": 2, "refresh_window": 1, "refresh_preserve": True, "refresh_samples": 4, "damping": 1e-2}
    run(folora_recipe(write_recipe, "refresh-preserve", method, training={"max_steps": 3, "lr": 2e-2}))
    folora = seen["method"]
    assert set(seen["rebased"]) == set(folora.names_by_key)
    for key, (c_t, c_p) in seen["rebased"].items():
        hand = seen["hand"][key]
        torch.testing.assert_close(c_p, hand, atol=1e-5, rtol=1e-4)
        if "layers.0.self_attn" not in key:  # past the embeddings the adapter-off measurement would fail
            assert (seen["base"][key] - hand).abs().max() > 10 * (1e-5 + 1e-4 * hand.abs().max()), key
        m = damped_preserve(hand, 1e-2).numpy()
        lam, vecs = scipy.linalg.eigh(((c_t + c_t.T) / 2).numpy(), m)
        v = folora.wrappers[folora.names_by_key[key][0]].basis.double()
        torch.testing.assert_close(v.T @ torch.from_numpy(m) @ v, torch.eye(v.shape[1], dtype=torch.float64),
                                   atol=1e-4, rtol=0)  # fmt: skip
        torch.testing.assert_close(folora.values[key].double().cpu(), torch.from_numpy(np.ascontiguousarray(lam[::-1])),
                                   atol=1e-6, rtol=1e-4)  # fmt: skip
def test_refresh_preserve_needs_refresh_every_and_not_the_shrink_step(write_recipe):
    from preserve_core.errors import RecipeError

    with pytest.raises(RecipeError, match="refresh_preserve re-measures C_p at each refresh: set refresh_every"):
        load_recipe(folora_recipe(write_recipe, "no-every", {"refresh_preserve": True}))
    with pytest.raises(RecipeError, match="step: shrink reads the calibration's C_p"):
        load_recipe(folora_recipe(write_recipe, "shrink", {"refresh_preserve": True, "refresh_every": 2, "step": "shrink"}))


def test_a_damping_too_small_for_float64_is_a_clear_error():
    """A rank-1 C_p (x x^T, x = (1, 1)): at damping 1e-300 eps = 1e-300 vanishes next to 1 in float64, so
    C_p + eps I is singular and its Cholesky factor fails; the error names the input, the damping and the fix."""
    from types import SimpleNamespace

    from preserve_core.errors import PPFTError

    method = Folora.__new__(Folora)
    method.options = SimpleNamespace(keep=None, damping=1e-300, step="penalty", task_shrinkage=0.0)
    method.ctx = SimpleNamespace(device=torch.device("cpu"))
    singular, task = torch.ones(2, 2), torch.eye(2)
    with pytest.raises(PPFTError, match=r"C_p \+ eps I of input layer.q \(width 2\) is not positive definite .*"
                                        r"damping 1e-300 .* Raise method.damping"):  # fmt: skip
        method._solve("layer.q", task, singular)
    method.options.damping = 1e-4  # eps = 1e-4: the same matrices solve
    assert method._solve("layer.q", task, singular)[0].vectors.shape == (2, 2)


def test_refresh_window_matches_calibration_statistics(write_recipe):
    """The window's C_t estimate over training batches equals collect_input_stats on the same batches."""
    from preserve_core.calibration import collect_input_stats
    from preserve_core.methods.folora.refresh import TaskWindow

    result = run(folora_recipe(write_recipe, "window", training={"max_steps": 1}))
    model = result.model
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, FoloraLinear)}
    batch = {
        "input_ids": torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41], [1, 22, 9, 2, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 8, [1] * 4 + [0] * 4]),
        "labels": torch.tensor([[-100] * 4 + [25, 43, 4, 5], [-100, -100, 9, 2] + [-100] * 4]),
    }
    for w in wrappers.values():
        w.record_inputs = True
    model.train()
    with torch.no_grad():
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # below the arming hook
    window = TaskWindow("loss")
    name = next(iter(wrappers))
    window.add_batch({"k": wrappers[name].last_input}, batch)
    with torch.no_grad(), _plain_linears(model, wrappers):
        expected, count = collect_input_stats(model, [name], [batch], "loss")[name]
    assert count == 6
    torch.testing.assert_close(dict(window.pop_estimates())["k"], expected, atol=1e-5, rtol=1e-5)


def _plain_linears(model, wrappers):
    from preserve_core.methods.folora.layer import plain_linears

    return plain_linears(model, wrappers, merge=False)


def test_refresh_window_with_gradient_checkpointing(write_recipe, monkeypatch):
    """Recomputation in backward does not record inputs again, and the window still sees every micro-batch."""
    tokens = []
    original = Folora.refresh

    def counting_refresh(self, optimizer, model=None):
        tokens.append({k: float(c) for k, c in self.window.counts.items()})
        assert all(w.last_input is None for w in self.wrappers.values())  # right after a backward
        original(self, optimizer)

    monkeypatch.setattr(Folora, "refresh", counting_refresh)
    path = folora_recipe(
        write_recipe, "ckpt", {"refresh_every": 2, "refresh_window": 1},
        model={"gradient_checkpointing": True}, training={"max_steps": 3, "grad_accum": 2, "batch_size": 4},
    )  # fmt: skip
    run(path)
    assert len(tokens) == 1 and len(set(tokens[0].values())) == 1 and next(iter(tokens[0].values())) > 0


def test_euclidean_step_divides_each_columns_gate_and_init_by_its_length(write_recipe, monkeypatch):
    """``step: euclidean``: gate_i / |v_i| in the optimizer, |v_i| from scipy's M-normalised eigenvectors of
    ``C_t v = lambda M v``; initial rows of ``A = A~ V^T`` have PEFT's mean squared norm 1/3."""
    import numpy as np
    import scipy.linalg

    seen = {}
    original = Folora.build_optimizer

    def capture(self, model, training):
        optimizer = original(self, model, training)
        seen["method"], seen["optimizer"] = self, optimizer
        seen["a0"] = {name: w.lora_A().detach().clone() for name, w in self.wrappers.items()}
        return optimizer

    monkeypatch.setattr(Folora, "build_optimizer", capture)
    run(folora_recipe(write_recipe, "euclid", {"step": "euclidean", "damping": 1e-2}, training={"max_steps": 1}))
    method, optimizer = seen["method"], seen["optimizer"]
    row_norms = []
    for key, names in method.names_by_key.items():
        c_t = method.ctx.calibration.cov_by_key("task", key).double().numpy()
        m = damped_preserve(method.ctx.calibration.cov_by_key("preserve", key), 1e-2).numpy()
        lam, vecs = scipy.linalg.eigh((c_t + c_t.T) / 2, m)  # ascending, vecs^T M vecs = I
        lengths = torch.from_numpy(np.linalg.norm(vecs[:, ::-1], axis=0).copy())
        lam = torch.from_numpy(lam[::-1].copy())
        expected = gate_values(lam, gamma_of(lam, 0.5), "soft").double() / lengths
        for name in names:
            got = optimizer.gate(method.wrappers[name].lora_A_tilde).double()
            torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-6)
            row_norms.append(seen["a0"][name].double().square().sum(1))
    assert lengths.max() > 3 * lengths.min()  # the penalty step would differ a lot between columns
    assert 0.25 < float(torch.cat(row_norms).mean()) < 0.42


def test_shrink_step_shortens_each_columns_euclidean_step_by_its_preserve_energy(write_recipe, monkeypatch):
    """``step: shrink``: gate_i / |v_i| * (1 + s p_i / mean)^(-1/2) with ``p_i = u_i^T C_p u_i`` of the unit
    direction ``u_i = v_i / |v_i|`` and ``mean = tr(C_p) / n``, all from scipy's M-normalised eigenvectors."""
    import numpy as np
    import scipy.linalg

    seen = {}
    original = Folora.build_optimizer

    def capture(self, model, training):
        optimizer = original(self, model, training)
        seen["method"], seen["optimizer"] = self, optimizer
        return optimizer

    monkeypatch.setattr(Folora, "build_optimizer", capture)
    options = {"step": "shrink", "shrink_strength": 50.0, "damping": 1e-2}
    run(folora_recipe(write_recipe, "shrink", options, training={"max_steps": 1}))
    method, optimizer = seen["method"], seen["optimizer"]
    shrinks = []
    for key, names in method.names_by_key.items():
        c_p = method.ctx.calibration.cov_by_key("preserve", key).double().numpy()
        c_t = method.ctx.calibration.cov_by_key("task", key).double().numpy()
        m = damped_preserve(torch.from_numpy(c_p), 1e-2).numpy()
        lam, vecs = scipy.linalg.eigh((c_t + c_t.T) / 2, m)
        vecs, lam = vecs[:, ::-1], torch.from_numpy(lam[::-1].copy())
        lengths = np.linalg.norm(vecs, axis=0)
        units = vecs / lengths
        energy = np.einsum("ni,nm,mi->i", units, (c_p + c_p.T) / 2, units)
        shrink = torch.from_numpy((1 + 50.0 * energy / (np.trace(c_p) / len(c_p))) ** -0.5)
        shrinks.append(shrink)
        expected = gate_values(lam, gamma_of(lam, 0.5), "soft").double() / torch.from_numpy(lengths.copy()) * shrink
        for name in names:
            torch.testing.assert_close(optimizer.gate(method.wrappers[name].lora_A_tilde).double(), expected,
                                       rtol=2e-3, atol=1e-6)  # fmt: skip
    shrinks = torch.cat(shrinks)
    assert shrinks.max() > 2 * shrinks.min()  # the shrink differs between columns: a plain rescale would fail


def test_task_shrinkage_by_hand():
    """(1 - s) C_t + s (tr C_t / n) I: C_t = [[2, 1], [1, 4]] has tr/n = 3, so s = .5 gives [[2.5, .5], [.5, 3.5]]."""
    from preserve_core.methods.folora.basis import shrunk_task

    c_t = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    expected = torch.tensor([[2.5, 0.5], [0.5, 3.5]], dtype=torch.float64)
    torch.testing.assert_close(shrunk_task(c_t, 0.5), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(shrunk_task(c_t, 0.0), c_t.double(), atol=0, rtol=0)


def test_full_task_shrinkage_ranks_directions_by_least_preserve_energy():
    """At s = 1 the solve reads C_t only through tr(C_t) / n = m: with C_p = R diag(p) R^T the solutions are
    v_i = r_i / sqrt(p_i + eps) with lambda_i = m / (p_i + eps), the least preserve energy first, whatever C_t's
    shape (here concentrated on the preserve-heavy r_0, r_1; s = 0 ranks r_1 first)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    p = torch.tensor([4.0, 1.0, 0.25, 0.0625], dtype=torch.float64)
    c_p = rot @ torch.diag(p) @ rot.T
    c_t = rot @ torch.diag(torch.tensor([9.0, 3.0, 0.1, 0.1], dtype=torch.float64)) @ rot.T  # m = 12.2 / 4
    eps = 1e-2 * float(p.sum()) / 4
    method = Folora.__new__(Folora)
    method.options = SimpleNamespace(keep=None, damping=1e-2, step="penalty", task_shrinkage=1.0)
    method.ctx = SimpleNamespace(device=torch.device("cpu"))
    basis, _ = method._solve("layer.q", c_t, c_p)
    order = [3, 2, 1, 0]  # least preserve energy first
    torch.testing.assert_close(basis.values, 3.05 / (p[order] + eps), atol=1e-9, rtol=1e-9)
    expected = rot[:, order] / (p[order] + eps).sqrt()
    signs = torch.sign((basis.vectors * expected).sum(0))
    torch.testing.assert_close(basis.vectors * signs, expected, atol=1e-9, rtol=1e-9)
    method.options.task_shrinkage = 0.0  # the spec: the best ratio 3 / 1 (r_1, preserve energy 1) comes first
    top = method._solve("layer.q", c_t, c_p)[0].vectors[:, 0]
    assert abs(float(top @ rot[:, 1])) / float(top.norm()) > 0.99


# -- init: gradient -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [7, 2])  # 2 < r: two rows are aligned, the third keeps its random start
def test_gradient_init_points_a_tilde_at_the_readable_task_gradient(m):
    """``align_a_tilde``: ``A~ = c Vh diag(d)`` with ``Vh`` the top right singular vectors of ``G V diag(d)``
    (float64 here, from the definition), ``c`` giving ``A = A~ V^T`` the random start's mean row norm; closed
    columns (d = 0) stay 0, and ``B = 0`` keeps the layer's output the base's."""
    n, k, r = 9, 6, 3
    g = torch.Generator().manual_seed(5)
    vectors = torch.randn(n, k, generator=g, dtype=torch.float64)  # any basis: V need not be orthonormal
    d = torch.tensor([1.5, 0.0, 0.7, 0.2, 0.0, 1.1], dtype=torch.float64)  # gate times step scale
    torch.manual_seed(2)
    layer = FoloraLinear(nn.Linear(n, m), vectors.float(), r=r, alpha=2 * r, dropout=0.0, init_std=0.3)
    start = layer.lora_A_tilde.detach().double().clone()
    size = (start @ vectors.T).norm(dim=1).mean()
    grad = torch.randn(m, n, generator=g, dtype=torch.float64)
    layer.align_a_tilde(grad.float(), d.float())
    _, _, vh = torch.linalg.svd((grad @ vectors) * d, full_matrices=False)
    aligned = min(r, m)
    rows = vh[:aligned] * d
    expected = rows * size / (rows @ vectors.T).norm(dim=1).mean()
    got = layer.lora_A_tilde.detach().double()
    signs = torch.sign((got[:aligned] * expected).sum(dim=1, keepdim=True))
    torch.testing.assert_close(got[:aligned] * signs, expected, atol=1e-5, rtol=1e-4)
    assert got[:aligned, [1, 4]].abs().max() == 0, "closed columns start at 0"
    torch.testing.assert_close(got[aligned:], start[aligned:], atol=0, rtol=0)
    if m == 7:
        torch.testing.assert_close((got @ vectors.T).norm(dim=1).mean(), size, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, n)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_gradient_init_runs_at_set_up_with_each_layers_gate_and_resumes_exactly(write_recipe, monkeypatch):
    """``init: gradient`` through the engine: ``A~`` at the optimizer's build is 0 on every column the hard gate
    closes (the random start, ``init_gated: false``, is not), and a resumed run ends where a straight one does
    (set-up runs again, the checkpoint's ``A~`` replaces its start)."""
    seen = []
    original = Folora.build_optimizer

    def capture(self, model, training):
        optimizer = original(self, model, training)
        a_tilde = {name: w.lora_A_tilde.detach().clone() for name, w in self.wrappers.items()}
        seen.append((a_tilde, {name: optimizer.gate(w.lora_A_tilde).clone() for name, w in self.wrappers.items()}))
        return optimizer

    monkeypatch.setattr(Folora, "build_optimizer", capture)
    method = {"gate": "hard", "gamma_quantile": 0.5, "init_rows": 6}
    common = {"max_steps": 6, "save_every": 3, "keep_last": 5, "lr": 2e-2, "batch_size": 4}
    run(folora_recipe(write_recipe, "gi-random", method, training=common))
    straight = run(folora_recipe(write_recipe, "gi-straight", {**method, "init": "gradient"}, training=common))
    (random_start, gates), (aligned, _) = seen
    for name, gate in gates.items():
        closed = gate == 0
        assert 0 < int(closed.sum()) < gate.numel()
        assert random_start[name][:, closed].abs().max() > 0
        assert aligned[name][:, closed].abs().max() == 0, name
        assert not torch.allclose(aligned[name], random_start[name])
    interrupted = folora_recipe(write_recipe, "gi-resumed", {**method, "init": "gradient"}, training=common)
    first = run(interrupted)
    rewind_to_previous_checkpoint(first.run_dir)
    run(interrupted, resume=True)
    assert len(seen) == 4, "set-up of the resumed run builds the optimizer again"
    assert_same_final_adapter(straight.run_dir, first.run_dir, atol=1e-6)
