"""Known answers for FORA's and FoLoRA's layers, bases, gates and optimizers, and the KL pieces.

References are written here from METHODS.md and the docstrings' formulas, in float64, on tensors of a
few entries (issue 13's mutation run: every branch and boundary of these functions).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from preserve_core.methods.adapter_export import _check_factors, _lora_config
from preserve_core.methods.folora.basis import gamma_of, gate_values, quantile_at, resolve_keep, transition
from preserve_core.methods.folora.gated_adam import GatedAdamW, unwrap_optimizer
from preserve_core.methods.folora.layer import FoloraLinear, default_init_std, install, plain_linears
from preserve_core.methods.fora.bases import (
    ForaBases,
    RightProjector,
    cap_count,
    channel_indices,
    compute_bases,
    needs_weight_svd,
)
from preserve_core.methods.fora.layer import ForaLinear
from preserve_core.methods.kl_terms import PreserveBatches, full_kl, masked_mean, pad_sequences

# -- FORA's bases -------------------------------------------------------------------------------


def test_cap_count_fraction_or_count():
    assert [cap_count(c, 5) for c in (0.5, 0.99, 1.0, 2, 2.9, 7)] == [2, 4, 1, 2, 2, 5]


def test_channel_indices_top_tail_and_clipped():
    assert channel_indices(5, 2, "top").tolist() == [0, 1]
    assert channel_indices(5, 2, "tail").tolist() == [3, 4]
    assert channel_indices(3, 7, "tail").tolist() == [0, 1, 2]
    assert channel_indices(3, 0, "top").tolist() == []


@pytest.mark.parametrize(
    ("source", "spectral", "u_rank", "u_energy", "needed"),
    [
        ("activation", 0, 0, 0.5, False),  # u_rank 0 overrides u_energy
        ("activation", 0, None, 0.0, False),
        ("activation", 0, None, 0.5, True),
        ("activation", 0, 2, 0.0, True),
        ("activation", 1, 0, 0.0, True),
        ("weight", 0, 0, 0.0, True),
    ],
)
def test_needs_weight_svd(source, spectral, u_rank, u_energy, needed):
    options = SimpleNamespace(source=source, spectral_size=spectral, u_rank=u_rank, u_energy=u_energy)
    assert needs_weight_svd(options) is needed


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def _projector(v: torch.Tensor) -> torch.Tensor:
    return v.double() @ v.double().T


def fora_options(**kw) -> SimpleNamespace:
    base = dict(source="activation", energy=0.9, rank=None, max_rank=100, u_energy=0.0, u_rank=0, u_max_rank=100,
                spectral_size=0, spectral_which="top")  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_compute_bases_from_the_weight_svd():
    """W [4, 6] with S = (9, 4, 2, 1) (S^2 = 81, 16, 4, 1; 81 is 0.794 of 102): energy 0.75 -> k = 1; U_1 by u_rank 2;
    a tail channel of 2."""
    u, v = _orthonormal(4, 4, 1), _orthonormal(6, 4, 2)
    w = (u @ torch.diag(torch.tensor([9.0, 4.0, 2.0, 1.0], dtype=torch.float64)) @ v.T).float()
    bases = compute_bases(w, None, fora_options(source="weight", energy=0.75, u_rank=2, spectral_size=2, spectral_which="tail"))
    assert bases.right.rank == 1 and not bases.right.complement
    torch.testing.assert_close(_projector(bases.right.vectors), _projector(v[:, :1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(bases.u1), _projector(u[:, :2]), atol=1e-5, rtol=0)
    for i, j in enumerate((2, 3)):  # u_c[:, i] v_c[:, i]^T is the triplet's rank-one direction
        torch.testing.assert_close(torch.outer(bases.u_c[:, i], bases.v_c[:, i]).double(), torch.outer(u[:, j], v[:, j]), atol=1e-5, rtol=0)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (bases.u1, bases.u_c, bases.v_c))
    energy = compute_bases(w, None, fora_options(source="weight", energy=0.99, u_energy=0.8, u_rank=None))
    assert energy.right.rank == 3 and energy.u1.shape == (4, 2)  # 0.99 of 102 needs 81 + 16 + 4; 0.8 needs 81 + 16
    assert not energy.right.complement and energy.right.vectors.shape == (6, 3)  # 2 k <= n: Q itself
    torch.testing.assert_close(_projector(energy.u1), _projector(u[:, :2]), atol=1e-5, rtol=0)
    assert energy.u_c.shape == (4, 0) and energy.v_c.shape == (6, 0)


def test_compute_bases_without_an_svd_keeps_the_given_projector():
    right = RightProjector(torch.eye(6)[:, :2])
    bases = compute_bases(torch.ones(4, 6, dtype=torch.float64), right, fora_options())
    assert bases.right is right
    assert bases.u1.shape == (4, 0) and bases.u_c.shape == (4, 0) and bases.v_c.shape == (6, 0)
    assert bases.u1.dtype == bases.v_c.dtype == torch.float32


def test_right_projector_keeps_the_smaller_basis():
    q2, q3 = _orthonormal(4, 2, 5).float(), _orthonormal(4, 3, 5).float()
    half = RightProjector.smaller_of(q2)  # 2 k == n: Q itself
    assert not half.complement and half.rank == 2 and half.vectors.shape == (4, 2)
    most = RightProjector.smaller_of(q3)
    assert most.complement and most.rank == 3 and most.vectors.shape == (4, 1)
    torch.testing.assert_close(_projector(most.protected()), _projector(q3), atol=1e-5, rtol=0)
    given = torch.ones(4, 1)
    assert RightProjector.smaller_of(q3, given).vectors is not None and torch.equal(RightProjector.smaller_of(q3, given).vectors, given)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = x - x @ _projector(q3)
    torch.testing.assert_close(most(x), expected, atol=1e-5, rtol=0)
    assert most(x).dtype == torch.float64
    torch.testing.assert_close(RightProjector(torch.zeros(4, 0))(x), x, atol=0, rtol=0)


# -- ForaLinear ---------------------------------------------------------------------------------

N, M = 3, 2
Q = torch.tensor([[1.0], [0.0], [0.0]])  # protects input e_0
U1 = torch.tensor([[1.0], [0.0]])  # protects output e_0
UC, VC = torch.tensor([[0.6], [0.8]]), torch.tensor([[0.0], [0.6], [0.8]])


def fora_layer(r: int, dropout: float = 0.0, channel: bool = True) -> ForaLinear:
    base = nn.Linear(N, M)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    bases = ForaBases(RightProjector(Q), U1, UC if channel else torch.zeros(M, 0), VC if channel else torch.zeros(N, 0))
    layer = ForaLinear(base, bases, r=r, alpha=4.0, dropout=dropout)
    with torch.no_grad():
        if r:
            layer.lora_A.copy_(torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]))
            layer.lora_B.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        if channel:
            layer.delta.fill_(2.0)
    return layer


def fora_delta(r: int, channel: bool = True) -> torch.Tensor:
    """``(alpha/r) P_U B A P_Q + U_c diag(delta) V_c^T`` by hand (alpha 4, r 2: scale 2)."""
    dw = torch.zeros(M, N, dtype=torch.float64)
    if r:
        a = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # first column removed
        b = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)  # first row removed
        dw += 2.0 * b @ a
    if channel:
        dw += 2.0 * UC.double() @ VC.double().T
    return dw


W_TRUE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
X = torch.tensor([[1.0, -1.0, 2.0], [0.5, 3.0, -2.0]])


@pytest.mark.parametrize(("r", "dropout", "channel"), [(2, 0.0, True), (2, 0.0, False), (2, 0.1, True), (0, 0.0, True)])
def test_fora_linear_forward_and_weights_by_hand(r, dropout, channel):
    layer = fora_layer(r, dropout, channel).eval()  # eval: dropout is the identity, the unfused path runs
    dw = fora_delta(r, channel)
    assert layer.scale == (2.0 if r else 0.0)
    expected = X.double() @ (W_TRUE + dw).T + torch.tensor([0.5, -0.5], dtype=torch.float64)
    torch.testing.assert_close(layer(X).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.added_weight().double(), dw, atol=1e-6, rtol=0)
    assert layer.added_weight().shape == (M, N) and layer.added_weight().dtype == torch.float32
    merged = layer.merged_weight()
    torch.testing.assert_close(merged.double(), W_TRUE + dw, atol=1e-6, rtol=0)
    a, b = layer.update_factors()
    assert a.shape == (r + int(channel), N) and b.shape == (M, r + int(channel)) and not a.requires_grad
    torch.testing.assert_close((b @ a).double(), dw, atol=1e-6, rtol=0)


def test_fora_linear_without_an_update():
    layer = fora_layer(0, channel=False)
    assert layer.delta is None and layer.update_factors() is None
    merged = layer.merged_weight()
    torch.testing.assert_close(merged.double(), W_TRUE, atol=0, rtol=0)
    assert merged is not layer.base.weight and merged.data_ptr() != layer.base.weight.data_ptr()
    torch.testing.assert_close(layer.added_weight(), torch.zeros(M, N), atol=0, rtol=0)
    torch.testing.assert_close(layer(X).double(), X.double() @ W_TRUE.T + torch.tensor([0.5, -0.5], dtype=torch.float64), atol=1e-5, rtol=0)


def test_fora_linear_fused_factors_and_gradients():
    layer = fora_layer(2)
    a, b = layer.factors()
    assert a.shape == (3, N) and b.shape == (M, 3)
    torch.testing.assert_close((b @ a).double(), fora_delta(2), atol=1e-6, rtol=0)
    layer(X).sum().backward()
    assert layer.lora_A.grad[:, 0].abs().max() == 0  # A's protected column gets no gradient through A'
    assert layer.lora_B.grad[0].abs().max() == 0 and layer.delta.grad.abs().item() > 0
    assert layer.in_features == N and layer.weight is layer.base.weight and layer.bias is layer.base.bias
    torch.testing.assert_close(layer.q, Q, atol=0, rtol=0)


# -- FoLoRA: gates, keep, schedule, transition --------------------------------------------------


def test_quantile_schedule():
    assert quantile_at(3, 10, "constant", 0.1, 0.7) == 0.7
    assert quantile_at(0, 10, "linear", 0.1, 0.7) == pytest.approx(0.1)
    assert quantile_at(5, 10, "linear", 0.1, 0.7) == pytest.approx(0.4)
    assert quantile_at(20, 10, "linear", 0.1, 0.7) == pytest.approx(0.7)  # clipped at the end
    assert quantile_at(1, 0, "linear", 0.1, 0.7) == pytest.approx(0.7)  # max_steps 0: no division by zero


def test_gamma_and_keep():
    assert gamma_of(torch.tensor([3.0, -1.0, 1.0]), 0.5) == 1.0
    assert gamma_of(torch.tensor([3.0, -1.0, 1.0]), 0.0) == 0.0  # negatives clamp to 0
    assert gamma_of(torch.tensor([4.0, 0.0, 2.0, 1.0]), 0.5) == 1.5
    assert [resolve_keep(k, 5) for k in (None, 0.5, 0.01, 0.99, 1.0, 3, 2.7, 10)] == [5, 2, 1, 4, 1, 3, 2, 5]


def test_gate_values_by_hand():
    lam = torch.tensor([4.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    soft = gate_values(lam, 2.0, "soft")
    assert soft.dtype == torch.float32
    torch.testing.assert_close(soft, torch.tensor([4 / 6, 0.5, 1 / 3, 0.0, 0.0]), atol=1e-7, rtol=0)
    sharp = gate_values(lam, 2.0, "temperature", temperature=0.5)  # l^2 / (l^2 + gamma^2)
    torch.testing.assert_close(sharp, torch.tensor([16 / 20, 0.5, 1 / 5, 0.0, 0.0]), atol=1e-7, rtol=0)
    assert gate_values(lam, 2.0, "hard").tolist() == [1, 1, 0, 0, 0]  # l >= gamma
    assert gate_values(lam, 0.0, "hard").tolist() == [1, 1, 1, 0, 0]  # and l > 0
    assert gate_values(torch.tensor([1.0, 3.0, 2.0]), 0.0, "hard", hard_k=1).tolist() == [0, 1, 0]
    assert gate_values(torch.tensor([1.0, 3.0]), 0.0, "soft").tolist() == [1.0, 1.0]  # gamma 0: open
    with pytest.raises(ValueError, match="unknown gate 'bogus'"):
        gate_values(lam, 1.0, "bogus")


def test_transition_moves_rows_between_m_orthonormal_bases():
    """``a~_new = a~_old T`` keeps the row ``a = V a~`` when both bases span the space."""
    m = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
    root = torch.linalg.cholesky(m)
    old = torch.linalg.solve_triangular(root.T, _orthonormal(3, 3, 1), upper=True)  # V^T M V = I
    new = torch.linalg.solve_triangular(root.T, _orthonormal(3, 3, 2), upper=True)
    t = transition(old.float(), new, m)
    assert t.dtype == torch.float64 and t.shape == (3, 3)
    torch.testing.assert_close(t, old.T @ m @ new, atol=1e-6, rtol=0)
    a_old = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close((a_old @ t) @ new.T, a_old @ old.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(transition(old, new[:, :2], m).shape, torch.Size([3, 2]))


# -- GatedAdamW ---------------------------------------------------------------------------------


def gated_reference(p, grads, gate, lr, b1, b2, eps, wd):
    """The module docstring's update in float64: p <- p - lr g ((m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps) + wd p)."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        grad = grad.double()
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * p
        p = p - lr * gate.double() * update
    return p, m, v


def test_gated_adamw_matches_its_formula():
    p0 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]])
    grads = [torch.tensor([[0.5, -1.0, 0.01], [2.0, 0.3, -0.02]]), torch.tensor([[0.1, 1.0, -0.03], [-1.0, 0.2, 0.05]]),
             torch.tensor([[0.4, 0.0, 0.02], [0.0, -0.6, 0.01]])]  # fmt: skip
    gate = torch.tensor([1.0, 0.5, 0.0])
    p = nn.Parameter(p0.clone())
    optimizer = GatedAdamW([p], lr=0.1, betas=(0.8, 0.9), eps=0.01, weight_decay=0.2)
    optimizer.set_gate(p, gate)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    expected, m, v = gated_reference(p0, grads, gate, 0.1, 0.8, 0.9, 0.01, 0.2)
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(optimizer.state[p]["exp_avg"].double(), m, atol=1e-6, rtol=1e-6)  # moments ungated
    torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"].double(), v, atol=1e-6, rtol=1e-6)
    assert float(optimizer.state[p]["step"]) == 3
    torch.testing.assert_close(p.detach()[:, 2], p0[:, 2], atol=0, rtol=0)  # gate 0: frozen, decay too


def test_gated_adamw_without_gate_decay_or_gradient():
    p0 = torch.tensor([[1.0, -2.0]])
    p, idle = nn.Parameter(p0.clone()), nn.Parameter(torch.ones(2))
    optimizer = GatedAdamW([p, idle], lr=0.05, betas=(0.9, 0.99), eps=1e-3)
    assert optimizer.gate(p) is None
    grads = [torch.tensor([[0.3, -0.7]]), torch.tensor([[-0.2, 0.1]])]
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    expected, _, _ = gated_reference(p0, grads, torch.ones(2), 0.05, 0.9, 0.99, 1e-3, 0.0)
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-6)
    assert idle not in optimizer.state and torch.equal(idle.detach(), torch.ones(2))
    assert optimizer.step(closure=lambda: torch.tensor(7.0)) == 7.0


def test_gated_adamw_gate_storage_and_coordinates():
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    optimizer = GatedAdamW([p], lr=0.1)
    gate = torch.tensor([1.0, 0.5, 0.0])
    optimizer.set_gate(p, gate)
    stored = optimizer.gate(p)
    assert stored.dtype == torch.float64 and torch.equal(stored, gate.double()) and stored.data_ptr() != gate.data_ptr()
    with pytest.raises(ValueError, match=r"a gate of shape \(2,\) does not fit a parameter \(2, 3\)"):
        optimizer.set_gate(p, torch.ones(2))
    t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.5, 0.5, -1.0]], dtype=torch.float64)  # [K_old, K_new]
    optimizer.change_coordinates(p, t)  # no moments yet: nothing to move
    assert "exp_avg" not in optimizer.state[p]
    m = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.0, 2.0]], dtype=torch.float64)
    optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"] = m.clone(), m.abs().clone()
    optimizer.change_coordinates(p, t)
    torch.testing.assert_close(optimizer.state[p]["exp_avg"], m @ t, atol=0, rtol=0)
    torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], m.abs() @ (t * t), atol=0, rtol=0)
    assert unwrap_optimizer(SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer))) is optimizer
    plain = SimpleNamespace()
    assert unwrap_optimizer(plain) is plain


# -- FoloraLinear -------------------------------------------------------------------------------


def folora_layer(dropout: float = 0.0) -> FoloraLinear:
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(W_TRUE.float())
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # V_K [n 3, K 2]
    layer = FoloraLinear(base, vectors, r=2, alpha=6.0, dropout=dropout, init_std=0.1)
    with torch.no_grad():
        layer.lora_A_tilde.copy_(torch.tensor([[1.0, 0.0], [0.5, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    return layer


def test_folora_linear_by_hand():
    layer = folora_layer()
    a = torch.tensor([[1.0, 0.0, 1.0], [0.5, -2.0, -0.5]], dtype=torch.float64)  # A~ V^T
    dw = 3.0 * torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64) @ a  # alpha / r = 3
    torch.testing.assert_close(layer.lora_A().double(), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.delta_weight().double(), dw, atol=1e-6, rtol=0)
    bias = torch.tensor([0.5, -0.5], dtype=torch.float64)
    layer.train()
    layer.record_inputs = True
    torch.testing.assert_close(layer(X).double(), X.double() @ (W_TRUE + dw).T + bias, atol=1e-5, rtol=0)
    assert torch.equal(layer.last_input, X) and not layer.last_input.requires_grad
    layer.enabled = False
    torch.testing.assert_close(layer(X).double(), X.double() @ W_TRUE.T + bias, atol=1e-5, rtol=0)
    other = folora_layer().eval()
    other.record_inputs = True
    other(X)
    assert other.last_input is None  # inputs are recorded in training only
    assert other.weight is other.base_layer.weight and isinstance(other.dropout, nn.Identity)
    assert isinstance(folora_layer(0.25).dropout, nn.Dropout) and folora_layer(0.25).dropout.p == 0.25


def test_folora_initial_factors():
    torch.manual_seed(0)
    layer = FoloraLinear(nn.Linear(300, 2), torch.eye(300)[:, :200], r=4, alpha=8.0, dropout=0.0, init_std=0.5)
    assert layer.lora_A_tilde.shape == (4, 200) and layer.lora_B.shape == (2, 4) and layer.scaling == 2.0
    assert layer.lora_A_tilde.std().item() == pytest.approx(0.5, rel=0.05) and layer.lora_B.abs().max() == 0
    assert default_init_std(6.0, 2, 1) == pytest.approx(1.0)  # sqrt(tr / (3 n K))
    assert default_init_std(0.0, 1, 3) == pytest.approx(math.sqrt(1e-12 / 9))


def test_install_and_plain_linears_merge_and_restore():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(W_TRUE.float())
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
    made = {}
    wrapper = install(model, "0", lambda linear: made.setdefault("w", folora_layer_from(linear)))
    assert model[0] is wrapper is made["w"]
    with plain_linears(model, {"0": wrapper}, merge=True) as inner:
        merged = inner[0]
        assert type(merged) is nn.Linear
        torch.testing.assert_close(merged.weight.double(), W_TRUE + wrapper.delta_weight().double(), atol=1e-6, rtol=0)
        torch.testing.assert_close(merged.bias, torch.tensor([0.5, -0.5]), atol=0, rtol=0)
        assert merged.bias.data_ptr() != wrapper.base_layer.bias.data_ptr()
    assert model[0] is wrapper
    with plain_linears(model, {"0": wrapper}, merge=False):
        assert model[0] is wrapper.base_layer
    assert model[0] is wrapper


def folora_layer_from(linear: nn.Linear) -> FoloraLinear:
    layer = FoloraLinear(linear, torch.eye(3)[:, :2], r=1, alpha=1.0, dropout=0.0, init_std=0.1)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    return layer


# -- KL pieces ----------------------------------------------------------------------------------


def test_full_kl_by_hand_with_temperature_and_mask():
    """Two positions, V = 2, T = 2; the second is masked. KL(p0 || p) with p0 = softmax(b / 2), p = softmax(s / 2)."""
    student = torch.tensor([[[2.0, 0.0], [5.0, -5.0]]])
    base = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    p0 = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    p = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    kl = float((p0 * (p0.log() - p.log())).sum())
    value = full_kl(student, base, torch.tensor([[1, 0]]), 2.0)
    assert float(value) == pytest.approx(kl, rel=1e-5)
    both = full_kl(student, base, torch.tensor([[1, 1]]), 2.0)
    q0, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.softmax(torch.tensor([2.5, -2.5], dtype=torch.float64), 0)
    assert float(both) == pytest.approx((kl + float((q0 * (q0.log() - q.log())).sum())) / 2, rel=1e-5)


def test_masked_mean_and_padding():
    values = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert float(masked_mean(values, torch.tensor([[1, 0], [1, 1]]))) == pytest.approx(13 / 3)
    assert float(masked_mean(values, torch.zeros(2, 2, dtype=torch.bool))) == 0.0
    ids, lengths = pad_sequences([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1] and ids.dtype == torch.long


def test_preserve_batches_follow_seeded_epoch_permutations():
    batches = PreserveBatches(5, 2, seed=3)
    orders = [torch.randperm(5, generator=torch.Generator().manual_seed(3 * 100_003 + e)).tolist() for e in range(2)]
    expected = [orders[0][0:2], orders[0][2:4], orders[1][0:2], orders[1][2:4]]  # the 5th index of an epoch is left out
    assert [batches.next() for _ in range(4)] == expected and batches.draws == 4
    rank1 = PreserveBatches(5, 4, seed=3, rank=1, world=2)  # rank 1 of 2 takes order[1::2]: 2 indices, one batch
    assert rank1.next() == orders[0][1::2] and rank1.next() == orders[1][1::2]
    lone = PreserveBatches(1, 4, seed=0, rank=1, world=2)  # no index of its own: the whole order
    assert lone.next() == [0]


# -- adapter export -----------------------------------------------------------------------------


def test_lora_config_has_scaling_one_and_patterns_for_the_odd_ranks():
    config = _lora_config({"a": 4, "b": 4, "c": 2}, "base/path")
    assert config.r == 4 and config.lora_alpha == 4
    assert config.rank_pattern == {"c": 2} and config.alpha_pattern == {"c": 2}
    assert sorted(config.target_modules) == ["a", "b", "c"] and config.base_model_name_or_path == "base/path"
    assert config.lora_dropout == 0.0 and config.bias == "none" and config.inference_mode is True
    assert str(config.task_type).endswith("CAUSAL_LM")
    with pytest.raises(ValueError, match="no factors to export"):
        _lora_config({}, None)


def test_check_factors_names_the_module_and_shapes():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    assert _check_factors(model, "0", torch.zeros(5, 3), torch.zeros(2, 5)) == 5
    with pytest.raises(ValueError, match="^1: not a linear layer of the base model$"):
        _check_factors(model, "1", torch.zeros(1, 3), torch.zeros(2, 1))
    for a, b in [((1, 4), (2, 1)), ((1, 3), (3, 1)), ((2, 3), (2, 1)), ((3,), (2, 1))]:
        with pytest.raises(ValueError, match=r"^0: factors A .* do not fit a \[2, 3\] weight as B @ A$"):
            _check_factors(model, "0", torch.zeros(*a), torch.zeros(*b))
    with pytest.raises(ValueError, match="^0: rank-0 factors cannot be stored as a LoRA; leave the module out$"):
        _check_factors(model, "0", torch.zeros(0, 3), torch.zeros(2, 0))


# -- ProjectedAdamW's edges (the equivalence with AdamW on M is tests/test_fora.py's) ------------


def test_projected_adamw_plain_parameters_take_adamw_steps_with_decay():
    from preserve_core.methods.fora.optim import ProjectedAdamW

    torch.manual_seed(0)
    ours, theirs, idle = nn.Parameter(torch.randn(3, 2)), None, nn.Parameter(torch.ones(2))
    theirs = nn.Parameter(ours.detach().clone())
    optimizer = ProjectedAdamW([ours, idle], lr=0.1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.3)
    reference = torch.optim.AdamW([theirs], lr=0.1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.3)
    for step in range(3):
        grad = torch.randn(3, 2)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        assert optimizer.step(closure=lambda: torch.tensor(float(step))) == float(step)
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    assert idle not in optimizer.state and torch.equal(idle.detach(), torch.ones(2))
    assert float(optimizer.state[ours]["step"]) == 3


def test_projected_adamw_projector_sharing_refresh_and_anchor_check():
    from preserve_core.methods.fora.optim import ProjectedAdamW

    q = torch.eye(3)[:, :2]  # k = 2 of 3: kept as its complement e_2, made once for both weights
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(2, 3))
    u1 = torch.zeros(2, 0)
    optimizer = ProjectedAdamW([a, b], lr=0.1, projectors={a: (q, u1), b: (q, u1)})
    assert optimizer.projectors[a][0] is optimizer.projectors[b][0] and optimizer.projectors[a][0].complement
    a.grad, b.grad = torch.ones(2, 3), torch.ones(2, 3)
    optimizer.step()
    assert a.detach()[:, :2].abs().max() == 0 and a.detach()[:, 2].abs().min() > 0.09  # only e_2 moves
    optimizer.set_projector(a, torch.eye(3)[:, 2:], torch.tensor([[1.0], [0.0]]))  # now protect e_2 and output row 0
    before = a.detach().clone()
    a.grad = torch.ones(2, 3)
    optimizer.step()
    moved = a.detach() - before
    assert moved[0].abs().max() == 0 and moved[1, 2] == 0 and moved[1, :2].abs().min() > 0
    with pytest.raises(ValueError, match="^weight decay on a projected parameter needs its W_0 anchor$"):
        ProjectedAdamW([a], lr=0.1, weight_decay=0.1, projectors={a: (q, u1)})
    decayed = ProjectedAdamW([a], lr=0.1, weight_decay=0.1, projectors={a: (q, u1)}, anchors={a: torch.zeros(2, 3)})
    assert decayed.anchors[a].shape == (2, 3)


def test_fora_linear_defaults_buffers_and_init():
    bases = ForaBases(RightProjector(Q.double()), U1.double(), UC.double(), VC.double())
    plain = ForaLinear(nn.Linear(N, M), bases)  # defaults: r 0 (full form), no dropout
    assert plain.r == 0 and plain.scale == 0.0 and not hasattr(plain, "lora_A") and plain.q_complement is False
    assert all(getattr(plain, k).dtype == torch.float32 for k in ("right", "u1", "u_c", "v_c"))  # float64 given
    assert set(plain.state_dict()) == {"base.weight", "base.bias", "delta"}  # the bases are not checkpointed
    lora = ForaLinear(nn.Linear(N, M), bases, r=2)
    assert lora.scale == 0.5 and isinstance(lora.dropout, nn.Identity)  # alpha defaults to 1
    assert set(lora.state_dict()) == {"base.weight", "base.bias", "lora_A", "lora_B", "delta"}
    assert isinstance(ForaLinear(nn.Linear(N, M), bases, r=2, dropout=0.1).dropout, nn.Dropout)
    torch.manual_seed(0)
    wide = ForaLinear(nn.Linear(100, M), ForaBases(RightProjector(torch.zeros(100, 0)), U1, UC, torch.zeros(100, 1)), r=64)
    bound = 1 / math.sqrt(100)  # PEFT's kaiming_uniform_(a = sqrt(5)): U(-1/sqrt(n), 1/sqrt(n))
    assert wide.lora_A.abs().max() <= bound and wide.lora_A.abs().max() > 0.99 * bound


@pytest.mark.parametrize(("r", "dropout", "channel"), [(2, 0.0, True), (2, 0.1, True), (2, 0.0, False), (0, 0.0, True)])
def test_fora_linear_keeps_a_bf16_models_dtype(r, dropout, channel):
    layer = fora_layer(r, dropout, channel).eval()
    layer.base.to(torch.bfloat16)
    out = layer(X.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = X.double() @ (W_TRUE + fora_delta(r, channel)).T + torch.tensor([0.5, -0.5], dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, atol=0.2, rtol=0.02)
    assert layer.merged_weight().dtype == torch.bfloat16


def test_gated_adamw_defaults_and_one_dimensional_gates():
    p = nn.Parameter(torch.zeros(3))
    optimizer = GatedAdamW([p])
    assert optimizer.defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **{
        k: v for k, v in optimizer.defaults.items() if k not in ("lr", "betas", "eps", "weight_decay")}}  # fmt: skip
    optimizer.set_gate(p, torch.tensor([1.0, 0.0, 0.5]))  # a [K] parameter takes a [K] gate
    p.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-1e-3, 0.0, -0.5e-3]), atol=1e-9, rtol=1e-5)
