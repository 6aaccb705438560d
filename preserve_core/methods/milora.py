"""``milora``: LoRA initialised from the *minor* ``r`` singular triplets of ``W`` (MiLoRA; PEFT has no
such init, so it is ours): ``W = U S V^T``, ``A_0 = sqrt(S_r/s) V_r^T``, ``B_0 = U_r sqrt(S_r/s)`` over
the ``r`` smallest singular values, base weight ``W - U_r S_r V_r^T``. Exported as a plain rank-``2r``
LoRA of the original base (:mod:`.residual_lora`)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .forms import lora_factors
from .lora import LoraOptions
from .residual_lora import ResidualLora, move_into_adapter, svd_factors


class MiloraOptions(LoraOptions):
    name: Literal["milora"] = "milora"


class Milora(ResidualLora):
    name = "milora"
    Options = MiloraOptions

    def initialise(self, model: nn.Module) -> None:
        for layer in self.lora_layers.values():
            _, _, s = lora_factors(layer)
            a0, b0 = svd_factors(layer.get_base_layer().weight, self.options.r, s, minor=True)
            move_into_adapter(layer, a0, b0)
