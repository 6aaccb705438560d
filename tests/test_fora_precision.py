"""FORA's projected AdamW on low-precision (bf16) weights: float32 masters keep ``dW Q = 0`` up to one
rounding of ``W``, equal the float32 optimizer step for step, and survive a state_dict round trip."""

from __future__ import annotations

import torch

from preserve_core.methods.fora.optim import ProjectedAdamW

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits: |round(x) - x| <= 2^-8 |x| (round to nearest)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0].float()


def _problem(m: int = 24, n: int = 20, seed: int = 0):
    """Two weights reading one input (one ``Q`` [n, 14]: the complement path), the second with ``U_1``
    [m, 3], and a plain parameter; values representable in bf16, so both precisions start equal."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(m, n, generator=g).bfloat16().float() for _ in range(2)]
    plain = torch.randn(m, generator=g).bfloat16().float()
    q, u1 = _orthonormal(n, 14, 1), _orthonormal(m, 3, 2)
    return weights, plain, q, u1


def _optimizer(params, anchors, q, u1) -> ProjectedAdamW:
    """Weight decay 0.1 towards ``anchors`` (``W_0``); the first weight without ``U_1``, the second with."""
    w1, w2, plain = params
    return ProjectedAdamW(
        [w1, w2, plain], lr=3e-2, weight_decay=0.1, projectors={w1: (q, torch.zeros(w1.shape[0], 0)), w2: (q, u1)},
        anchors={w1: anchors[0].to(w1.dtype), w2: anchors[1].to(w2.dtype)},
    )  # fmt: skip


def test_bf16_masters_equal_the_float32_optimizer_step_for_step():
    """Same gradients (bf16-representable) to a float32 run and a bf16 run: every master equals the float32
    weight bit for bit, every bf16 weight is its rounding, moments are float32; a state_dict round trip
    mid-way (torch would cast state to bf16) changes nothing."""
    weights, plain, q, u1 = _problem()
    wide = [torch.nn.Parameter(t.clone()) for t in (*weights, plain)]
    low = [torch.nn.Parameter(t.clone().bfloat16()) for t in (*weights, plain)]
    reference, ours = _optimizer(wide, weights, q, u1), _optimizer(low, weights, q, u1)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        for a, b in zip(wide, low):
            grad = torch.randn(a.shape, generator=g).bfloat16()
            a.grad, b.grad = grad.float(), grad
        reference.step()
        ours.step()
        if step == 2:
            saved = ours.state_dict()
            assert all(s["master"].dtype == torch.float32 for s in saved["state"].values())
            ours = _optimizer(low, weights, q, u1)
            ours.load_state_dict(saved)
    for a, b in zip(wide, low):
        state = ours.state[b]
        assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(state["master"], a.detach())
        assert torch.equal(state["exp_avg_sq"], reference.state[a]["exp_avg_sq"])
        assert torch.equal(b.detach(), a.detach().bfloat16())
    assert (wide[0].detach() - weights[0]).norm() > 0.1


def test_bf16_leak_with_masters_is_one_rounding_of_w_not_accumulated():
    """After 100 steps: ``||(W_t - W_0) Q|| <= ||(W_t - W~_t) Q|| + ||(W~_t - W_0) Q||
    <= 2^-8 ||W~_t|| + float32 rounding`` (``Q`` orthonormal, ``W_t = round(W~_t)``). Without masters the
    rounding errors of every step add up in span(Q): several times that bound."""
    m, n, k = 48, 40, 24
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(m, n, generator=g).bfloat16()
    q = _orthonormal(n, k, 1)
    leaks = {}
    for master in (True, False):
        w = torch.nn.Parameter(w0.clone())
        optimizer = ProjectedAdamW([w], lr=1e-2, projectors={w: (q, torch.zeros(m, 0))}, master_weights=master)
        grads = torch.Generator().manual_seed(2)
        for _ in range(100):
            w.grad = torch.randn(m, n, generator=grads).bfloat16()
            optimizer.step()
        d_w = w.detach().double() - w0.double()
        leaks[master] = float((d_w @ q.double()).norm())
        if master:
            exact = optimizer.state[w]["master"].double()
            bound = BF16_UNIT_ROUNDOFF * float(exact.norm())
            assert float(((exact - w0.double()) @ q.double()).norm()) < 1e-5 * float((exact - w0.double()).norm())
            assert leaks[True] <= bound
    assert d_w.norm() > 1.0  # the weights did move
    assert leaks[False] > 3 * bound > 3 * leaks[True]
