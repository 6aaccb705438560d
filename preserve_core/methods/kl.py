"""``kl`` (output matching, LwF): a form (``full`` or ``lora``) plus the ``kl`` regulariser,
``lambda T^2 KL(p_0^T || p^T)`` on preserve batches (see :mod:`.regularizers.kl` for the math, the
``frozen`` / ``cached`` references and the preserve batches).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import PRESERVE_DATA
from .forms import FormOptions, FormWithRegularizer
from .regularizer_options import KlRegularizerOptions
from .regularizers.kl import KlRegularizer


class KlOptions(FormOptions, KlRegularizerOptions):
    name: Literal["kl"] = "kl"


class Kl(FormWithRegularizer):
    name = "kl"
    Options = KlOptions
    needs = frozenset({PRESERVE_DATA})
    Regularizer = KlRegularizer

    @classmethod
    def has_calibration_extra(cls, options: KlOptions) -> bool:
        return True  # the top-k cache is written for either reference, so a later `cached` run reuses it

    def keeps_theta0(self) -> bool:
        return self.options.reference == "frozen"

    def divergence(self, model: nn.Module) -> torch.Tensor:
        return self.regularizer.divergence(model)
