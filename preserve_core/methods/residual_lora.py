"""LoRA initialisations that move part of ``W`` into the adapter (``pissa``, ``milora``, ``corda_kpm``).

At init the adapter holds ``s B_0 A_0`` (``A_0 [r, n]``, ``B_0 [m, r]``, ``s`` the LoRA scaling) and
the base weight becomes the residual ``W_res = W - s B_0 A_0``, so the model's output is unchanged.
After training ``W_res + s B A = W + dW`` with ``dW = s (B A - B_0 A_0)``, which is exactly the
rank-``2r`` LoRA ``[s B | -s B_0] [A ; A_0]``: the export writes that (scaling 1, through
:func:`.adapter_export.save_lora_factors_as_peft`), so the adapter applies to the *original* base
model. ``A_0``/``B_0`` are recomputed (deterministically) from the base on resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from .adapter_export import save_lora_factors_as_peft
from .base import Method
from .forms import lora_factors
from .lora import LoraOptions, lora_config


class ResidualLora(Method):
    """Subclasses give :meth:`peft_init` (``init_lora_weights`` and extras for ``LoraConfig``) and/or
    override :meth:`initialise` (called on the PEFT model before the residual is recorded)."""

    is_adapter = True

    def peft_init(self, model: nn.Module) -> dict:
        return {}

    def initialise(self, model: nn.Module) -> None:
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = get_peft_model(model, lora_config(self.options, self.ctx.target_modules, **self.peft_init(model)))
        inner = model.base_model.model
        self.lora_layers = {name: inner.get_submodule(name) for name in self.ctx.target_modules}
        self.initialise(model)
        self.initial = {name: tuple(f.detach().clone() for f in lora_factors(layer)[:2]) for name, layer in self.lora_layers.items()}
        return model

    def delta_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A' [2r, n], B' [m, 2r])}`` with ``B' A' = s (B A - B_0 A_0)``."""
        factors = {}
        for name, layer in self.lora_layers.items():
            a, b, s = lora_factors(layer)
            a0, b0 = self.initial[name]
            factors[name] = (torch.cat([a, a0]).detach(), torch.cat([s * b, -s * b0], dim=1).detach())
        return factors

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        inner = model.base_model.model
        save_lora_factors_as_peft(out_dir, inner, self.delta_factors(), tokenizer, self.base_ref)
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(out_dir / "merged", safe_serialization=True)
            tokenizer.save_pretrained(out_dir / "merged")


@torch.no_grad()
def move_into_adapter(layer: nn.Module, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Set the adapter to ``(A_0, B_0)`` and the base weight to ``W - s B_0 A_0``."""
    a, b, s = lora_factors(layer)
    a.copy_(a0)
    b.copy_(b0)
    weight = layer.get_base_layer().weight
    weight.copy_((weight.float() - s * (b0.float() @ a0.float())).to(weight.dtype))


def svd_factors(weight: torch.Tensor, r: int, s: float, minor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_0, B_0)`` with ``s B_0 A_0 = U_r S_r V_r^T`` for the top (or, ``minor``, bottom) ``r``
    singular triplets of ``weight [m, n]``: ``A_0 = sqrt(S_r/s) V_r^T``, ``B_0 = U_r sqrt(S_r/s)``."""
    u, sv, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    pick = slice(-r, None) if minor else slice(0, r)
    root = (sv[pick] / s).sqrt()
    return root[:, None] * vh[pick], u[:, pick] * root[None]
