"""Projected AdamW: FORA's full-rank form trained on ``W`` itself.

Training ``M`` in ``W = W_0 + P_U M P_Q`` with AdamW is exactly, on ``W``::

    G' = P_U G P_Q                              # the gradient with respect to M
    m  = b1 m + (1 - b1) G';  v = b2 v + (1 - b2) G'^2
    D  = (lr / (1 - b1^t)) m / (sqrt(v / (1 - b2^t)) + eps)
    W <- W - lr wd P_U (W - W_0) P_Q            # decoupled decay of M, seen on W (only if wd > 0)
    W <- W - P_U D P_Q

so the only extra ``[m, n]`` tensors are Adam's two moments (plus ``W_0`` when ``wd > 0``).
Parameters without a projector (e.g. the spectral channel's ``delta``) get plain AdamW.

Under FSDP (``W`` a row-sharded ``DTensor``: this rank holds rows ``W_i`` [m_i, n]) every step runs on
the local rows: ``X P_Q`` is row-local (``Q`` is replicated), while ``P_U X = X - U_1 (U_1^T X)``
needs ``U_1^T X = sum_i U_1,i^T X_i`` [r_u, n], one all-reduce per projection (``U_1,i``: the same rows of ``U_1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ...sharding import like, local, row_group
from .bases import RightProjector, orthonormal_complement, project_left


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW where ``projectors[p] = (right, U_1 [m, r_u])`` confines ``p``'s update to ``P_U . P_Q``.

    ``right`` is a :class:`.bases.RightProjector` or ``Q`` [n, k] itself; for a bare ``Q`` that
    spans more than half of the input space the complement is computed once per distinct ``Q``.

    ``anchors[p] = W_0`` is where weight decay pulls a projected ``p`` (required when its group has
    ``weight_decay > 0``). Neither is part of ``state_dict`` (the method owns and checkpoints them).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        projectors: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None,
        anchors: dict[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._made: dict[int, RightProjector] = {}
        self.projectors = {p: (_as_projector(right, self._made), u1) for p, (right, u1) in (projectors or {}).items()}
        self.anchors = {p: like(w0, p) for p, w0 in (anchors or {}).items()}
        self._row_blocks: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            if group["weight_decay"] > 0:
                missing = [p for p in group["params"] if p in self.projectors and p not in self.anchors]
                if missing:
                    raise ValueError("weight decay on a projected parameter needs its W_0 anchor")

    def set_projector(self, p: torch.Tensor, right, u1: torch.Tensor) -> None:
        """Project ``p``'s later steps with ``(right, U_1)`` (FORA's refresh of ``Q``); moments are kept."""
        self.projectors[p] = (_as_projector(right, self._made), u1)

    def project(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``P_U x P_Q`` for a projected ``p``; ``x`` unchanged otherwise. ``x``: ``p``'s local rows."""
        if p not in self.projectors:
            return x
        right, u1 = self.projectors[p]
        group = row_group(p)
        if group is None or u1.shape[1] == 0:
            return project_left(right(x), u1)
        x = right(x)
        rows = self._local_rows(p, u1).to(x.dtype)
        inner = rows.T @ x  # [r_u, n]: this rank's part of U_1^T X
        torch.distributed.all_reduce(inner, group=group)
        return x - rows @ inner

    def _local_rows(self, p: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        """The rows of ``U_1`` [m, r_u] that match ``p``'s local rows (split exactly as ``p`` is)."""
        block = self._row_blocks.get(p)
        if block is None:
            block = self._row_blocks[p] = local(like(u1.to(p.dtype), p)).to(u1.dtype)
        return block

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(params, group)
        return loss

    def _update_group(self, params: list[torch.Tensor], group: dict) -> None:
        """One AdamW step for ``params``: projections per tensor, moment arithmetic batched (``_foreach``)."""
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads, exp_avgs, exp_avg_sqs, corrections = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            grads.append(self.project(p, _wide(local(p.grad))).to(p.dtype))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            corrections.append((lr / (1 - beta1**t), math.sqrt(1 - beta2**t)))
            if decay:
                self._decay(p, lr * decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [c[1] for c in corrections])
        torch._foreach_add_(denoms, eps)
        for p, m, denom, (step_size, _) in zip(params, exp_avgs, denoms, corrections, strict=True):
            step = _wide(m) / _wide(denom) * step_size
            local(p).sub_(self.project(p, step).to(p.dtype))

    def _decay(self, p: torch.Tensor, amount: float) -> None:
        """``p <- p - amount P_U (p - W_0) P_Q`` if projected, else plain ``p <- (1 - amount) p``."""
        if p in self.projectors:
            w = local(p)
            w.sub_((amount * self.project(p, _wide(w) - _wide(local(self.anchors[p])))).to(p.dtype))
        else:
            local(p).mul_(1 - amount)


def _as_projector(right, made: dict[int, RightProjector]) -> RightProjector:
    """``right`` as a projector; a bare ``Q`` becomes the smaller of ``Q`` / ``Q_c``, once per tensor."""
    if isinstance(right, RightProjector):
        return right
    if id(right) not in made:
        made[id(right)] = RightProjector.smaller_of(right)
    return made[id(right)]


__all__ = ["ProjectedAdamW", "orthonormal_complement"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (projections of bf16/fp16 tensors run in float32)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
