"""``full``: plain full fine-tuning of the target modules with AdamW (the unprotected baseline)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .base import Method, MethodOptions


class FullOptions(MethodOptions):
    name: Literal["full"] = "full"


def unfreeze_targets(model: nn.Module, target_modules: list[str], train_embeddings: bool) -> None:
    """Freeze everything, then let the target linears (weight and bias) train; optionally embeddings too."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in target_modules:
        modules[name].requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().requires_grad_(True)


class FullFineTune(Method):
    name = "full"
    Options = FullOptions

    def prepare_model(self, model: nn.Module) -> nn.Module:
        unfreeze_targets(model, self.ctx.target_modules, self.ctx.recipe.model.train_embeddings)
        return model
