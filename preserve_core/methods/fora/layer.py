"""``ForaLinear``: a target ``nn.Linear`` with FORA's LoRA branch and/or spectral channel.

With ``r > 0`` (LoRA form), per forward call (not per token)::

    A' = A - (A Q) Q^T            # [r, n]: reads no protected input direction
    B' = B - U_1 (U_1^T B)        # [m, r]: writes no dominant output direction
    y  = W x + (alpha / r) B' (A' dropout(x)) + U_c (delta * (V_c^T x))

With ``r = 0`` (full-rank form) ``W`` itself trains (its projected AdamW keeps the update in the
protected space) and the layer adds only the channel, folded into the weight once per call:
``y = (W + U_c diag(delta) V_c^T) x``. The bases are non-persistent float32 buffers, recomputed
from calibration on resume (the checkpoint holds their hash); ``P_Q``'s basis (``Q`` or its complement,
see :class:`.bases.RightProjector`) is one tensor shared by every layer reading the same input.
``A``, ``B`` and ``delta`` are float32 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .bases import ForaBases, RightProjector, project_left


class ForaLinear(nn.Module):
    def __init__(
        self, base: nn.Linear, bases: ForaBases, r: int = 0, alpha: float = 1.0, dropout: float = 0.0,
        init: str = "kaiming",
    ):  # fmt: skip
        super().__init__()
        self.base = base
        self.r = r
        self.scale = alpha / r if r else 0.0
        device = base.weight.device
        self.q_complement = bases.right.complement
        self.register_buffer("right", bases.right.vectors.to(device=device, dtype=torch.float32), persistent=False)
        shrink_vectors = bases.right.shrink_vectors if bases.right.shrink_vectors is not None else torch.zeros(0, 0)
        shrink = bases.right.shrink if bases.right.shrink is not None else torch.zeros(0)
        self.register_buffer("shrink_vectors", shrink_vectors.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("shrink", shrink.to(device=device, dtype=torch.float32), persistent=False)
        for key in ("u1", "u_c", "v_c"):
            tensor = getattr(bases, key).to(device=device, dtype=torch.float32)
            self.register_buffer(key, tensor, persistent=False)
        m, n = base.weight.shape
        if r:
            self.lora_A = nn.Parameter(torch.empty(r, n, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's LoRA init
            if init == "complement":
                self._init_in_complement()
            self.lora_B = nn.Parameter(torch.zeros(m, r, device=device))
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.delta = nn.Parameter(torch.zeros(self.u_c.shape[1], device=device)) if self.u_c.shape[1] else None

    @torch.no_grad()
    def _init_in_complement(self) -> None:
        """Rows of ``A`` projected onto the complement of ``Q`` and rescaled to their Kaiming norm.

        ``A_i <- (A_i P_Q) |A_i| / |A_i P_Q|``: at step 0 ``A' = A`` and each row has PEFT's initial size
        whatever ``k`` is (a Kaiming row projected on ``n - k`` of ``n`` directions keeps only about
        ``sqrt((n - k) / n)`` of its norm, which slows B's first steps as ``k -> n``). Rows whose
        projection vanishes (``k = n``) become 0.
        """
        a = self.lora_A
        projected = self.projector(a)
        norms, full = projected.norm(dim=1, keepdim=True), a.norm(dim=1, keepdim=True)
        alive = norms > 1e-4 * full  # below: float32 rounding of a row Q spans entirely
        scale = torch.where(alive, full / norms.clamp_min(1e-30), torch.zeros_like(norms))
        a.copy_(projected * scale)

    @torch.no_grad()
    def align_a(self, task_grad: torch.Tensor) -> None:
        """``init: gradient``: A's rows <- the top right singular vectors of ``G P`` (``task_grad = G`` [m, n]),
        each at the mean row norm of the A they replace (:mod:`..gradient_init`). With ``min(m, n) < r`` the
        rest stay Kaiming."""
        _, _, vh = torch.linalg.svd(self.projector(task_grad.float()), full_matrices=False)
        k = min(self.r, vh.shape[0])
        size = self.lora_A.norm(dim=1).mean()
        self.lora_A[:k].copy_(vh[:k] * size)

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def projector(self) -> RightProjector:
        """``X -> X P_Q`` over this layer's (shared) basis."""
        return RightProjector(self.right, self.q_complement, self.shrink_vectors, self.shrink)  # empty: no shrink

    @property
    def q(self) -> torch.Tensor:
        """``Q`` [n, k], the protected input directions (computed when the complement is what is kept)."""
        return self.projector.protected()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.r and self.delta is not None:
            # full form: fold the channel into the weight once per call (no per-token path); costs one
            # [m, n] temporary kept for the backward pass
            w = self.base.weight
            return F.linear(x, w + (self.u_c * self.delta).to(w.dtype) @ self.v_c.T.to(w.dtype), self.base.bias)
        y = self.base(x)
        if self.r and self.delta is not None and isinstance(self.dropout, nn.Identity):
            a, b = self.factors()  # one rank-(r+s) product instead of two skinny ones
            return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)
        if self.r:
            a, b = self.branch_factors()
            y = y + F.linear(F.linear(self.dropout(x).to(a.dtype), a), b).to(y.dtype)
        if self.delta is not None:
            y = y + F.linear(F.linear(x.to(self.v_c.dtype), self.v_c.T) * self.delta, self.u_c).to(y.dtype)
        return y

    def branch_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A' [r, n], (alpha/r) B' [m, r])``: the LoRA branch as ``B A`` with scaling folded in."""
        return self.projector(self.lora_A), self.scale * project_left(self.lora_B, self.u1)

    def channel_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V_c^T [s, n], U_c diag(delta) [m, s])``."""
        return self.v_c.T, self.u_c * self.delta

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's update over ``W`` as ``(A [r+s, n], B [m, r+s])`` with ``dW = B A``, with grad; None if empty.

        LoRA form: ``A = [A'; V_c^T]``, ``B = [(alpha/r) B' | U_c diag(delta)]``. Full form: the channel only.
        """
        parts = [self.branch_factors()] if self.r else []
        if self.delta is not None:
            parts.append(self.channel_factors())
        if not parts:
            return None
        return torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1)

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`factors`, detached (for export and merging)."""
        factors = self.factors()
        return None if factors is None else (factors[0].detach(), factors[1].detach())

    def added_weight(self) -> torch.Tensor:
        """The update the layer adds on top of ``base.weight``, float32 [m, n], with grad
        (LoRA form: branch and channel; full form: the channel; zeros when there is neither)."""
        parts = [self.branch_factors()] if self.r else []
        if self.delta is not None:
            parts.append(self.channel_factors())
        added = torch.zeros(self.base.weight.shape, device=self.base.weight.device)
        for a, b in parts:
            added = added + b @ a
        return added

    def merged_weight(self) -> torch.Tensor:
        """``W + dW`` in ``W``'s dtype."""
        factors = self.update_factors()
        weight = self.base.weight.detach()
        if factors is None:
            return weight.clone()
        a, b = factors
        return (weight.float() + b @ a).to(weight.dtype)
