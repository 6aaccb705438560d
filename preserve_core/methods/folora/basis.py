"""FoLoRA's spectral basis and gates: the generalized Rayleigh quotient of task utility over forgetting.

For one layer input of width ``n`` with preserve and task second moments ``C_p``, ``C_t`` ([n, n]):

    M = C_p + eps I,  eps = damping * tr(C_p) / n
    C_t v_i = lambda_i M v_i,  V^T M V = I,  lambda_1 >= lambda_2 >= ... >= 0

Solved in float64: ``M = L L^T`` (Cholesky), ``S = L^{-1} C_t L^{-T}`` (symmetric), ``S = W diag(lambda) W^T``
(``eigh``), ``V = L^{-T} W``. A row ``a = V a~`` of the LoRA factor ``A`` then has forgetting penalty
``a^T M a = |a~|^2`` and task utility ``a^T C_t a = sum_i lambda_i a~_i^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Basis:
    """``vectors``: V_K, float64 [n, K] with ``V_K^T M V_K = I_K``; ``values``: lambda, float64 [K], descending."""

    vectors: torch.Tensor
    values: torch.Tensor


def damped_preserve(c_p: torch.Tensor, damping: float) -> torch.Tensor:
    """``M = C_p + eps I`` in float64, ``eps = damping * tr(C_p) / n`` (``damping`` alone when ``tr(C_p) = 0``)."""
    c = c_p.double()
    n = c.shape[0]
    scale = float(torch.trace(c)) / n
    eps = damping * scale if scale > 0 else damping
    return (c + c.T) / 2 + eps * torch.eye(n, dtype=c.dtype, device=c.device)


def shrunk_task(c_t: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - s) C_t + s (tr(C_t) / n) I`` in float64 (``s = shrinkage``): ``C_t`` shrunk towards its mean eigenvalue.

    At ``s = 1`` the quotient no longer reads the task: ``V`` are ``C_p``'s eigenvectors and the top ``lambda``
    are the directions with the least preserve energy (FORA's complement, in FoLoRA's coordinates).
    """
    c = c_t.double()
    if shrinkage == 0:
        return c
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    return (1 - shrinkage) * c + shrinkage * (float(torch.trace(c)) / n) * eye


def resolve_keep(keep: int | float | None, n: int) -> int:
    """Directions kept: all (None), a fraction of ``n`` when ``keep < 1`` (floored, at least 1), else a count.

    Same convention as FORA's caps (so ``1.0`` means one direction).
    """
    if keep is None:
        return n
    if keep < 1:
        return max(1, min(n, math.floor(keep * n)))
    return max(1, min(n, int(keep)))


def generalized_basis(c_t: torch.Tensor, c_p: torch.Tensor, damping: float, keep: int) -> Basis:
    """The top-``keep`` solutions of ``C_t v = lambda (C_p + eps I) v`` (see the module docstring).

    Temporaries are freed as soon as they are used: the peak is about five float64 [n, n] matrices.
    """
    lower = torch.linalg.cholesky(damped_preserve(c_p, damping))
    half = torch.linalg.solve_triangular(lower, c_t.to(lower), upper=False)  # L^{-1} C_t
    s = torch.linalg.solve_triangular(lower, half.T, upper=False)  # L^{-1} C_t L^{-T}
    del half
    s = s.add_(s.T.clone()).mul_(0.5)
    values, w = torch.linalg.eigh(s)
    del s
    values, w = values.flip(0)[:keep], w.flip(1)[:, :keep]
    vectors = torch.linalg.solve_triangular(lower.T, w, upper=True)  # L^{-T} W
    return Basis(vectors, values)


def transition(old_vectors: torch.Tensor, new_vectors: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``T = V_old^T M V_new`` (float64 [K_old, K_new]): new coordinates of a row are ``a~_new = a~_old T``.

    From ``a = V_old a~_old`` and ``V_new^{-1} = V_new^T M``. With ``K = n`` ``T`` is orthogonal (both bases
    are M-orthonormal), so gradients and first moments move by the same ``T``; with ``K < n`` it is the
    M-orthogonal projection of the old span onto the new one.
    """
    return old_vectors.double().T @ (m @ new_vectors.double())


# -- gates --------------------------------------------------------------------------------------


def quantile_at(step: int, max_steps: int, schedule: str, start: float, end: float) -> float:
    """The quantile that sets ``gamma`` for the next update: constant ``end``, or linear ``start -> end``."""
    if schedule == "constant":
        return end
    progress = min(1.0, step / max(max_steps, 1))
    return start + (end - start) * progress


def gamma_of(values: torch.Tensor, quantile: float) -> float:
    """``gamma`` = the ``quantile`` of the (non-negative) ``lambda`` of one layer input."""
    return float(torch.quantile(values.double().clamp_min(0), quantile))


def gate_values(
    values: torch.Tensor, gamma: float, kind: str, temperature: float = 1.0, hard_k: int | None = None
) -> torch.Tensor:
    """``g_i = g(lambda_i)``, float32 [K].

    soft: ``l / (l + gamma)`` (= ``sigmoid(log l - log gamma)``); temperature: ``sigmoid((log l - log gamma) / T)``
    (T = 1 is soft, T -> 0 the hard threshold); hard: 1 on the top ``hard_k`` directions, or where
    ``l >= gamma`` when ``hard_k`` is None, 0 elsewhere.
    """
    lam = values.double().clamp_min(0)
    if kind == "hard":
        if hard_k is not None:
            gate = torch.zeros_like(lam)
            gate[torch.argsort(lam, descending=True)[:hard_k]] = 1.0
            return gate.float()
        return ((lam >= gamma) & (lam > 0)).float()
    tiny = torch.finfo(torch.float64).tiny
    logit = torch.log(lam.clamp_min(tiny)) - math.log(max(gamma, tiny))
    if kind == "soft":
        return torch.sigmoid(logit).float()
    if kind == "temperature":
        return torch.sigmoid(logit / temperature).float()
    raise ValueError(f"unknown gate {kind!r}")
