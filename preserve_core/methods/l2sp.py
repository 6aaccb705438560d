"""``l2sp``: pull the trained parameters towards the pretrained ones, ``(alpha/2) ||theta - theta_0||^2``.

The penalty is added to the loss (coupled, so Adam rescales its gradient like the task gradient's;
that is L2-SP as published). ``form: full``: over every trained parameter (the target linears, and
the embeddings with ``model.train_embeddings``). ``form: lora`` (our interpretation): over the
effective weight change, ``sum_layers ||s B A||_F^2``, computed from two ``r x r`` Gram matrices.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .forms import FormMethod, FormOptions, lora_delta_sq_norm


class L2spOptions(FormOptions):
    name: Literal["l2sp"] = "l2sp"
    strength: float = Field(0.01, ge=0, description="alpha: the penalty is (alpha / 2) ||theta - theta_0||^2.")


class L2sp(FormMethod):
    name = "l2sp"
    Options = L2spOptions

    def penalty(self) -> torch.Tensor:
        """``(alpha/2) sum ||dtheta||^2`` (a scalar with grad)."""
        if self.options.form == "lora":
            total = sum(lora_delta_sq_norm(layer) for layer in self.lora_layers.values())
        else:
            total = sum((d.float() ** 2).sum() for d in self.weight_deltas().values())
        return 0.5 * self.options.strength * total

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return self.penalty() if self.options.strength > 0 else None
