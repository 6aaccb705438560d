"""``corda_kpm``: CorDA in knowledge-preserved mode, fed with our calibration's preserve covariance ``C_p``.

Per target layer (``W [m, n]``, ``C = C_p + d I [n, n]``, ``d = damping * mean(diag C_p)``), as PEFT's
``init_lora_weights="corda"`` with ``corda_method="kpm"`` computes it::

    W C = U S Vh  (SVD),   W = U S (Vh C^-1)
    A_0 = sqrt(S_r / s) (Vh C^-1)_r,   B_0 = U_r sqrt(S_r / s)     over the r *smallest* singular values

so the adapter starts on the components of ``W`` that the preserve inputs excite least and the base
keeps the residual ``W - s B_0 A_0``. Exported as a plain rank-``2r`` LoRA of the original base
(:mod:`.residual_lora`).

Our interpretations: the math is ours rather than PEFT's code, because ``peft.tuners.lora.corda``
imports the ``attrs`` package, which PEFT does not declare (and we do not install); PEFT doubles the
damping until its float32 inverse is accurate, we solve in float64 with the fixed ``damping``; PEFT
scales each batch's activations by their max before summing, ``C_p`` is the plain mean
``(1/N) sum x x^T`` (CorDA is invariant to a global scale of the covariance).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import PRESERVE_STATS
from .forms import lora_factors
from .lora import LoraOptions
from .residual_lora import ResidualLora, move_into_adapter


class CordaKpmOptions(LoraOptions):
    name: Literal["corda_kpm"] = "corda_kpm"
    damping: float = Field(0.01, gt=0, description="d = damping * mean(diag C_p) is added to C_p before inverting.")


def corda_kpm_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, s: float, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_0 [r, n], B_0 [m, r])`` of CorDA-KPM for ``weight [m, n]`` and input covariance ``cov [n, n]``."""
    c = cov.double()
    c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    u, sv, vh = torch.linalg.svd(weight.double() @ c, full_matrices=False)
    rows = torch.linalg.solve(c, vh[-r:].T).T  # (Vh C^-1)_r, C symmetric
    root = (sv[-r:] / s).sqrt()
    dtype = weight.dtype
    return (root[:, None] * rows).to(dtype), (u[:, -r:] * root[None]).to(dtype)


class CordaKpm(ResidualLora):
    name = "corda_kpm"
    Options = CordaKpmOptions
    needs = frozenset({PRESERVE_STATS})

    def initialise(self, model: nn.Module) -> None:
        for name, layer in self.lora_layers.items():
            weight = layer.get_base_layer().weight
            cov = self.ctx.calibration.preserve_cov(name).to(weight.device)
            _, _, s = lora_factors(layer)
            move_into_adapter(layer, *corda_kpm_factors(weight, cov, self.options.r, s, self.options.damping))
