"""Projected AdamW: FORA's full-rank form trained on ``W`` itself.

Training ``M`` in ``W = W_0 + P_U M P_Q`` with AdamW is exactly, on ``W``::

    G' = P_U G P_Q                              # the gradient with respect to M
    m  = b1 m + (1 - b1) G';  v = b2 v + (1 - b2) G'^2
    D  = (lr / (1 - b1^t)) m / (sqrt(v / (1 - b2^t)) + eps)
    W <- W - lr wd P_U (W - W_0) P_Q            # decoupled decay of M, seen on W (only if wd > 0)
    W <- W - P_U D P_Q

so the only extra ``[m, n]`` tensors are Adam's two moments (plus ``W_0`` when ``wd > 0``).
Parameters without a projector (e.g. the spectral channel's ``delta``) get plain AdamW.

Low-precision weights (bfloat16, float16) get a float32 master copy ``W~`` and float32 moments: the
step above runs on ``W~`` exactly as on a float32 weight, and the weight holds ``round(W~)``. Rounding
``W`` itself every step would put each step's rounding error (not confined to ``P_Q``'s range) into
``W`` for good: on bf16 weights ``||(W_t - W_0) Q|| / ||W_t - W_0||`` reached 0.25 after 3 steps.
With the master, ``(W~_t - W_0) Q = 0`` to float32 rounding and ``W_t - W~_t`` is one rounding
(``|.| <= 2^-9 |W~_t|`` elementwise in bf16), never accumulated. Cost: 4 bytes per weight for the
master, and moments in float32 (4 more than bf16 moments).

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

LOW_PRECISION = (torch.bfloat16, torch.float16)  # weights that get a float32 master copy


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW where ``projectors[p] = (right, U_1 [m, r_u])`` confines ``p``'s update to ``P_U . P_Q``.

    ``right`` is a :class:`.bases.RightProjector` or ``Q`` [n, k] itself; for a bare ``Q`` that
    spans more than half of the input space the complement is computed once per distinct ``Q``.

    ``anchors[p] = W_0`` is where weight decay pulls a projected ``p`` (required when its group has
    ``weight_decay > 0``). Neither is part of ``state_dict`` (the method owns and checkpoints them).

    ``master_weights`` (default True): low-precision ``p`` are updated through a float32 master kept
    in ``state[p]["master"]`` (so in ``state_dict`` and checkpoints); False updates them in place
    (measurements only: the projection's guarantee does not survive the rounding).
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
        master_weights: bool = True,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._made: dict[int, RightProjector] = {}
        self.projectors = {p: (_as_projector(right, self._made), u1) for p, (right, u1) in (projectors or {}).items()}
        self.anchors = {p: like(w0, p) for p, w0 in (anchors or {}).items()}
        self._row_blocks: dict[torch.Tensor, torch.Tensor] = {}
        self.master_weights = master_weights
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

    def _state(self, p: torch.Tensor) -> dict:
        """``p``'s state, created on first use: moments (float32 with a master), a float32 master for a
        low-precision ``p``."""
        state = self.state[p]
        if not state:
            master = self.master_weights and p.dtype in LOW_PRECISION
            dtype = torch.float32 if master else p.dtype
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if master:
                state["master"] = p.detach().to(torch.float32, copy=True)
        return state

    def _update_group(self, params: list[torch.Tensor], group: dict) -> None:
        """One AdamW step for ``params``: projections per tensor, moment arithmetic batched (``_foreach``)."""
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        weights, grads, exp_avgs, exp_avg_sqs, corrections = [], [], [], [], []
        for p in params:
            state = self._state(p)
            state["step"] += 1
            t = float(state["step"])
            weight = local(state["master"]) if "master" in state else local(p)  # what the step updates
            weights.append(weight)
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            grads.append(self.project(p, _wide(local(p.grad))).to(exp_avgs[-1].dtype))
            corrections.append((lr / (1 - beta1**t), math.sqrt(1 - beta2**t)))
            if decay:
                self._decay(p, weight, lr * decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [c[1] for c in corrections])
        torch._foreach_add_(denoms, eps)
        for p, weight, m, denom, (step_size, _) in zip(params, weights, exp_avgs, denoms, corrections, strict=True):
            step = _wide(m) / _wide(denom) * step_size
            weight.sub_(self.project(p, step).to(weight.dtype))
            if weight is not local(p):
                local(p).copy_(weight)  # round the master once into the low-precision weight

    def _decay(self, p: torch.Tensor, weight: torch.Tensor, amount: float) -> None:
        """``W <- W - amount P_U (W - W_0) P_Q`` if ``p`` is projected, else ``W <- (1 - amount) W``;
        ``weight``: ``p``'s local rows or their float32 master."""
        if p in self.projectors:
            weight.sub_((amount * self.project(p, _wide(weight) - _wide(local(self.anchors[p])))).to(weight.dtype))
        else:
            weight.mul_(1 - amount)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that float32 masters and moments stay float32 (torch casts every floating
        state tensor to its parameter's dtype, which would round a bf16 weight's master)."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(ids, params, strict=True):
            kept = saved.get(index, {})
            if "master" in kept:
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    self.state[p][key] = kept[key].to(device=p.device, dtype=torch.float32, copy=True)


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
