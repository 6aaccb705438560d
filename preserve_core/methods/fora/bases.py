"""FORA's per-layer bases: the protected input directions ``Q``, output directions ``U_1`` and the
spectral channel ``(U_c, V_c)``, plus the two projections that use them.

For a target ``W`` of shape ``[m, n]``:

- ``Q`` ``[n, k]``: top eigenvectors of ``C_p`` (``source: activation``) or top right singular
  vectors of ``W`` (``source: weight``); ``P_Q = I - Q Q^T``.
- ``U_1`` ``[m, r_u]``: top left singular vectors of ``W``; ``P_U = I - U_1 U_1^T``.
- ``U_c`` ``[m, s]``, ``V_c`` ``[n, s]``: ``s`` singular triplets of ``W`` (top or tail).

The projectors are never formed: ``X P_Q = X - (X Q) Q^T`` (or ``(X Q_c) Q_c^T`` with the complement
``Q_c`` when that is smaller) and ``P_U X = X - U_1 (U_1^T X)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RightProjector:
    """``X -> X P_Q`` (``P_Q = I - Q Q^T``, ``Q`` [n, k] orthonormal), kept as whichever basis is smaller.

    ``complement=False``: ``vectors = Q`` and ``X P_Q = X - (X Q) Q^T`` (4 n k flops per row of X).
    ``complement=True``: ``vectors = Q_c`` [n, n - k], the orthonormal complement, and
    ``X P_Q = (X Q_c) Q_c^T`` (4 n (n - k) flops per row). Layers that share an input share one object.
    """

    vectors: torch.Tensor
    complement: bool = False
    shrink_vectors: torch.Tensor | None = None  # [n, j], orthonormal, inside the complement (residual_shrink)
    shrink: torch.Tensor | None = None  # [j], the fraction 1 - s_i of each such direction removed

    @property
    def rank(self) -> int:
        """``k``, the number of protected directions."""
        n, cols = self.vectors.shape
        return n - cols if self.complement else cols

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``X P_Q`` for ``X`` [..., n], in ``X``'s dtype."""
        v = self.vectors.to(x.dtype)
        if self.complement:
            out = (x @ v) @ v.T
        else:
            out = x if v.shape[1] == 0 else x - (x @ v) @ v.T
        if self.shrink_vectors is not None and self.shrink_vectors.shape[1]:
            vs = self.shrink_vectors.to(x.dtype)
            out = out - ((x @ vs) * self.shrink.to(x.dtype)) @ vs.T
        return out

    def protected(self) -> torch.Tensor:
        """``Q`` [n, k] itself (computed from ``Q_c`` when that is what is kept; for export and checks)."""
        return orthonormal_complement(self.vectors) if self.complement else self.vectors

    @classmethod
    def smaller_of(cls, q: torch.Tensor, complement: torch.Tensor | None = None) -> RightProjector:
        """From ``Q`` [n, k] (and, if known, its complement): ``Q_c`` when ``k > n - k``, else ``Q``."""
        n, k = q.shape
        if 2 * k <= n:
            return cls(q.contiguous())
        return cls((complement if complement is not None else orthonormal_complement(q)).contiguous(), True)


def orthonormal_complement(q: torch.Tensor) -> torch.Tensor:
    """``Q_c`` [n, n - k] with ``[Q Q_c]`` orthonormal: the trailing left singular vectors of ``Q`` [n, k]."""
    u = torch.linalg.svd(q.double(), full_matrices=True)[0]
    return u[:, q.shape[1] :].to(q.dtype).contiguous()


@dataclass
class ForaBases:
    """All float32. ``right``: P_Q's projector (``Q`` [n, k] or ``Q_c``), ``u1`` [m, r_u], ``u_c`` [m, s],
    ``v_c`` [n, s]; widths may be 0."""

    right: RightProjector
    u1: torch.Tensor
    u_c: torch.Tensor
    v_c: torch.Tensor


def project_right(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``X P_Q = X - (X Q) Q^T`` for ``X`` [..., n], ``Q`` [n, k] (identity when ``k = 0``)."""
    return RightProjector(q)(x)


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


def input_projector(cov: torch.Tensor, options) -> RightProjector:
    """``P_Q`` of one layer input from its ``C_p`` [n, n] (only the upper triangle is read): ``Q`` = the
    top ``k`` eigenvectors (``k`` by ``options.energy`` / ``rank`` / ``max_rank``, eigenvalues clamped at
    0), or the trailing ``n - k`` when fewer. The eigensolver runs in ``cov``'s dtype (float64 or float32)
    on its device; only the kept float32 columns survive (transient: the matrix, the eigenvectors and
    LAPACK's workspace, about four [n, n] matrices: 1.2 GB at n = 6144 in float64)."""
    if cov.dtype not in (torch.float32, torch.float64):
        cov = cov.double()
    values, vectors = torch.linalg.eigh(cov, UPLO="U")
    values = values.double().flip(0).clamp_min(0)
    k = select_rank(values, options.energy, options.rank, options.max_rank)
    n = vectors.shape[0]
    shrink_vectors, shrink = residual_shrink(values, vectors, k, getattr(options, "residual_shrink", 0.0))
    del values
    # eigh's columns ascend: the top k are the last k (reversed), the complement the first n - k
    if 2 * k <= n:
        kept = vectors[:, n - k :].flip(1).float().contiguous()
        complement = False
    else:
        kept = vectors[:, : n - k].flip(1).float().contiguous()
        complement = True
    del vectors
    return RightProjector(kept, complement, shrink_vectors, shrink)


def residual_shrink(
    values: torch.Tensor, vectors: torch.Tensor, k: int, strength: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The soft half of ``P_Q`` (``residual_shrink``, ours): each unprotected eigendirection ``v_i`` of ``C_p``
    is kept at ``s_i = (1 + strength * lambda_i / mean(lambda))^(-1/2)`` of its length instead of 1.

    ``values`` [n] descending, ``vectors`` [n, n] ``eigh``'s ascending columns, ``k`` protected. An Adam
    step moves ``A`` by about ``lr`` per entry whatever the gradient's size, so ``A P`` moves along ``v_i``
    by about ``lr s_i``: the preserve output change one step can make along ``v_i``, ``lambda_i s_i^2``,
    is at most ``mean(lambda) / strength`` however much preserve energy ``v_i`` carries, while directions
    the preserve inputs do not use (``lambda_i ~ 0``) stay fully readable. Returns ``(V_s [n, j], 1 - s [j])``
    for the ``j`` directions with ``1 - s_i > 1e-4`` (float32), or ``(None, None)`` when ``strength`` is 0.
    """
    if strength <= 0:
        return None, None
    n = values.numel()
    mean = float(values.sum()) / n
    rest = values[k:]
    cut = 1 - (1 + strength * rest / max(mean, 1e-300)).rsqrt()
    j = int((cut > 1e-4).sum())  # values descend, so the cut does too: the first j are the ones kept
    columns = vectors[:, : n - k].flip(1)[:, :j]  # ascending -> descending, the complement's leading j
    return columns.float().contiguous(), cut[:j].float().contiguous()


def weight_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``W`` [m, n] in float64: ``U`` [m, p], ``S`` [p] descending, ``V`` [n, p]; ``p = min(m, n)``."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return u, s, vh.T


def channel_indices(p: int, size: int, which: str) -> torch.Tensor:
    """Which ``size`` of the ``p`` singular triplets form the spectral channel: the top or the tail."""
    size = min(size, p)
    return torch.arange(size) if which == "top" else torch.arange(p - size, p)


def needs_weight_svd(options) -> bool:
    """Whether any basis comes from ``W``'s SVD: ``source: weight``, a spectral channel, or ``U_1``."""
    u_disabled = options.u_rank == 0 or (options.u_rank is None and options.u_energy <= 0)
    return options.source == "weight" or options.spectral_size > 0 or not u_disabled


def compute_bases(weight: torch.Tensor, right: RightProjector | None, options) -> ForaBases:
    """The bases of one layer from its weight and (``source: activation``) the projector of its ``C_p``.

    ``options`` carries energy/rank/max_rank (for ``Q``), u_energy/u_rank/u_max_rank (for ``U_1``),
    spectral_size/spectral_which (for the channel). Singular-vector energies use ``S^2``. With
    ``u_rank: 0`` and ``spectral_size: 0`` (and ``source: activation``) no SVD of ``W`` runs.
    """
    m, n = weight.shape
    empty = weight.new_zeros(m, 0, dtype=torch.float32), weight.new_zeros(n, 0, dtype=torch.float32)
    if not needs_weight_svd(options):
        return ForaBases(right, empty[0], empty[0], empty[1])
    u, s, v = weight_svd(weight)
    power = s.square()
    if options.source == "weight":
        k = select_rank(power, options.energy, options.rank, options.max_rank)
        right = RightProjector.smaller_of(v[:, :k].float())
    r_u = select_rank(power, options.u_energy, options.u_rank, options.u_max_rank)
    channel = channel_indices(s.numel(), options.spectral_size, options.spectral_which)
    return ForaBases(
        right=right,
        u1=u[:, :r_u].float().contiguous(),
        u_c=u[:, channel].float().contiguous(),
        v_c=v[:, channel].float().contiguous(),
    )
