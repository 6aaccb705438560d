"""``ewc``: a form (``full`` or ``lora``) plus the ``ewc`` regulariser,
``(lambda/2) sum_i F_i (theta_i - theta_0,i)^2`` with the true-Fisher diagonal ``F`` of the preserve
data, cached at calibration (see :mod:`.regularizers.ewc` for the estimator). ``form: lora`` (our
interpretation): the penalty is on the effective weight change ``dW = s B A`` with the Fisher of ``W``.
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import PRESERVE_DATA
from .forms import FormOptions, FormWithRegularizer
from .regularizer_options import EwcRegularizerOptions
from .regularizers.ewc import EwcRegularizer, diagonal_fisher, fisher_parameter_names


class EwcOptions(FormOptions, EwcRegularizerOptions):
    name: Literal["ewc"] = "ewc"


class Ewc(FormWithRegularizer):
    name = "ewc"
    Options = EwcOptions
    needs = frozenset({PRESERVE_DATA})
    Regularizer = EwcRegularizer

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return self.regularizer.fisher

    def penalty(self) -> torch.Tensor:
        """``(lambda/2) sum F dtheta^2`` (a scalar with grad)."""
        return self.regularizer.penalty()


__all__ = ["Ewc", "EwcOptions", "diagonal_fisher", "fisher_parameter_names"]
