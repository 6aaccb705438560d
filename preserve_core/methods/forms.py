"""The trainable parametrisation under a regulariser baseline (``replay``, ``l2sp``, ``ewc``, ``kl``).

``form: full`` trains the target linears themselves, exactly as :mod:`.full`; ``form: lora`` trains a
PEFT LoRA on them, exactly as :mod:`.lora`. Either way the regulariser sees the same thing: the
change of each trained base parameter ``dtheta = theta - theta_0``. For LoRA that is the weight
update ``dW = s B A`` (``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; ``A [r, n]``,
``B [m, r]``), i.e. the regulariser acts on the effective weight ``W_0 + dW`` and ``theta_0 = W_0``
(``dW = 0`` at init because ``B = 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import get_peft_model
from pydantic import Field
from torch import nn

from .base import Method, MethodOptions
from .full import unfreeze_targets
from .lora import export_peft, lora_config

ADAPTER = "default"


class FormOptions(MethodOptions):
    """Fields shared by the regulariser baselines: which parametrisation trains."""

    form: Literal["full", "lora"] = Field("full", description="full: train the target linears; lora: a PEFT LoRA on them.")
    r: int = Field(8, gt=0, description="LoRA rank (form: lora).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: dW = (alpha / r) B A (form: lora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (form: lora).")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead (form: lora).")


class FormMethod(Method):
    """A method that trains per ``options.form`` and offers :meth:`weight_deltas` to its regulariser.

    ``is_adapter`` depends on the recipe here: the class says False (``form: full``, the default) and
    each instance says ``form == "lora"`` (the pattern ``fora`` uses too).
    """

    is_adapter = False

    def __init__(self, options: FormOptions, ctx):
        super().__init__(options, ctx)
        self.is_adapter = options.form == "lora"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.options.form == "lora":
            model = get_peft_model(model, lora_config(self.options, self.ctx.target_modules))
            inner = model.base_model.model
            self.lora_layers = {name: inner.get_submodule(name) for name in self.ctx.target_modules}
            return model
        unfreeze_targets(model, self.ctx.target_modules, self.ctx.recipe.model.train_embeddings)
        self.trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {n: p.detach().clone() for n, p in self.trained.items()} if self.keeps_theta0() else {}
        return model

    def keeps_theta0(self) -> bool:
        """Whether ``form: full`` keeps a copy of the pretrained trained weights (one extra copy in memory)."""
        return True

    def delta_names(self) -> list[str]:
        """The keys of :meth:`weight_deltas`."""
        if self.options.form == "lora":
            return [f"{name}.weight" for name in self.lora_layers]
        return list(self.trained)

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{base parameter name: theta - theta_0}`` with grad; for LoRA ``{"<module>.weight": s B A}``."""
        if self.options.form == "lora":
            return {f"{name}.weight": lora_delta(layer) for name, layer in self.lora_layers.items()}
        return {n: p - self.theta0[n] for n, p in self.trained.items()}

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        if self.options.form == "lora":
            export_peft(model, out_dir, tokenizer, merge, self.base_ref)
        else:
            super().export(model, out_dir, tokenizer, merge)


def lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, n], B [m, r], s)`` of a PEFT LoRA layer's default adapter."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER])


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """``dW = s B A``, shape ``[m, n]``."""
    a, b, s = lora_factors(layer)
    return s * (b @ a)


def lora_delta_sq_norm(layer: nn.Module) -> torch.Tensor:
    """``||s B A||_F^2 = s^2 tr((B^T B)(A A^T))``: two ``r x r`` Gram matrices, no ``m x n`` product."""
    a, b, s = lora_factors(layer)
    return s * s * ((b.T @ b) * (a @ a.T)).sum()
