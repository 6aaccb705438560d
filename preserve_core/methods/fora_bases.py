"""FORA's per-layer bases: the protected input directions ``Q``, output directions ``U_1`` and the
spectral channel ``(U_c, V_c)``, plus the two projections that use them.

For a target ``W`` of shape ``[m, n]``:

- ``Q`` ``[n, k]``: top eigenvectors of ``C_p`` (``source: activation``) or top right singular
  vectors of ``W`` (``source: weight``); ``P_Q = I - Q Q^T``.
- ``U_1`` ``[m, r_u]``: top left singular vectors of ``W``; ``P_U = I - U_1 U_1^T``.
- ``U_c`` ``[m, s]``, ``V_c`` ``[n, s]``: ``s`` singular triplets of ``W`` (top or tail).

The projectors are never formed: ``X P_Q = X - (X Q) Q^T`` and ``P_U X = X - U_1 (U_1^T X)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForaBases:
    """All float32. ``q`` [n, k], ``u1`` [m, r_u], ``u_c`` [m, s], ``v_c`` [n, s]; widths may be 0."""

    q: torch.Tensor
    u1: torch.Tensor
    u_c: torch.Tensor
    v_c: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "u1": self.u1, "u_c": self.u_c, "v_c": self.v_c}


def project_right(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``X P_Q = X - (X Q) Q^T`` for ``X`` [..., n], ``Q`` [n, k] (identity when ``k = 0``)."""
    if q.shape[1] == 0:
        return x
    q = q.to(x.dtype)
    return x - (x @ q) @ q.T


def project_left(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``P_U X = X - U_1 (U_1^T X)`` for ``X`` [m, ...], ``U_1`` [m, r_u] (identity when ``r_u = 0``)."""
    if u.shape[1] == 0:
        return x
    u = u.to(x.dtype)
    return x - u @ (u.T @ x)


def cap_count(cap: float, size: int) -> int:
    """``cap`` < 1 is a fraction of ``size`` (floored), otherwise a count; never more than ``size``."""
    return min(size, int(cap * size) if cap < 1 else int(cap))


def select_rank(values: torch.Tensor, energy: float, rank: int | None, max_rank: float) -> int:
    """How many leading directions to keep, from non-negative ``values`` sorted descending.

    ``rank`` given: that count (only bounded by ``len(values)``). Otherwise the smallest ``k`` with
    ``sum(values[:k]) >= energy * sum(values)``, capped by ``max_rank`` (fraction if < 1, else count).
    """
    size = values.numel()
    if rank is not None:
        return min(rank, size)
    total = float(values.sum())
    if energy <= 0 or total <= 0:
        return 0
    cumulative = torch.cumsum(values.double(), 0) / total
    k = int((cumulative < energy - 1e-12).sum()) + 1
    return min(k, size, cap_count(max_rank, size))


def input_eigenbasis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) [n] and eigenvectors [n, n] of a symmetric ``C_p``, float64."""
    cov = cov.double()
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def weight_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``W`` [m, n] in float64: ``U`` [m, p], ``S`` [p] descending, ``V`` [n, p]; ``p = min(m, n)``."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u, s, vh.T


def channel_indices(p: int, size: int, which: str) -> torch.Tensor:
    """Which ``size`` of the ``p`` singular triplets form the spectral channel: the top or the tail."""
    size = min(size, p)
    return torch.arange(size) if which == "top" else torch.arange(p - size, p)


def compute_bases(weight: torch.Tensor, input_basis: tuple[torch.Tensor, torch.Tensor] | None, options) -> ForaBases:
    """The bases of one layer from its weight and (``source: activation``) the eigenbasis of its ``C_p``.

    ``options`` carries energy/rank/max_rank (for ``Q``), u_energy/u_rank/u_max_rank (for ``U_1``),
    spectral_size/spectral_which (for the channel). Singular-vector energies use ``S^2``.
    """
    u, s, v = weight_svd(weight)
    power = s.square()
    if options.source == "activation":
        values, vectors = input_basis
    else:
        values, vectors = power, v
    k = select_rank(values, options.energy, options.rank, options.max_rank)
    r_u = select_rank(power, options.u_energy, options.u_rank, options.u_max_rank)
    channel = channel_indices(s.numel(), options.spectral_size, options.spectral_which)
    return ForaBases(
        q=vectors[:, :k].float().contiguous(),
        u1=u[:, :r_u].float().contiguous(),
        u_c=u[:, channel].float().contiguous(),
        v_c=v[:, channel].float().contiguous(),
    )
