"""``l2sp`` regulariser: pull the weights towards the pretrained ones, ``(alpha/2) sum_layers ||dW||_F^2``.

``dW`` is the method's own account of its weight change (``method.weight_deltas()``): ``theta -
theta_0`` of the trained parameters for full fine-tuning, ``s B A`` for LoRA (from two ``r x r`` Gram
matrices, no ``m x n`` product), FORA's ``P_U M P_Q + U_c diag(delta) V_c^T``, FoLoRA's ``s B A~ V^T``.
The penalty is added to the loss (coupled, as L2-SP was published).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Regularizer
from ..regularizer_options import L2spRegularizerOptions


class L2spRegularizer(Regularizer):
    name = "l2sp"
    Options = L2spRegularizerOptions

    def attach(self, model: nn.Module, method) -> None:
        method.track_weight_deltas()
        self.method = method

    def penalty(self) -> torch.Tensor:
        """``(alpha/2) sum ||dtheta||^2`` (a scalar with grad)."""
        return 0.5 * self.options.strength * self.method.weight_delta_sq_norm()

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return self.penalty() if self.options.strength > 0 else None
