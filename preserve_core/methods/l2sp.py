"""``l2sp``: a form (``full`` or ``lora``) plus the ``l2sp`` regulariser, ``(alpha/2) ||theta - theta_0||^2``.

``form: full``: over every trained parameter (the target linears, and the embeddings with
``model.train_embeddings``). ``form: lora`` (our interpretation): over the effective weight change,
``sum_layers ||s B A||_F^2``, computed from two ``r x r`` Gram matrices (see :mod:`.regularizers.l2sp`).
"""

from __future__ import annotations

from typing import Literal

import torch

from .forms import FormOptions, FormWithRegularizer
from .regularizer_options import L2spRegularizerOptions
from .regularizers.l2sp import L2spRegularizer


class L2spOptions(FormOptions, L2spRegularizerOptions):
    name: Literal["l2sp"] = "l2sp"


class L2sp(FormWithRegularizer):
    name = "l2sp"
    Options = L2spOptions
    Regularizer = L2spRegularizer

    def penalty(self) -> torch.Tensor:
        """``(alpha/2) sum ||dtheta||^2`` (a scalar with grad)."""
        return self.regularizer.penalty()
