"""``lora``: plain LoRA through PEFT; exports a stock PEFT adapter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MethodOptions
from .forms import FormMethod, export_peft, lora_config


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead.")


class Lora(FormMethod):
    """A PEFT LoRA on the target linears (``form: lora``), exported as a stock adapter."""

    name = "lora"
    Options = LoraOptions
    is_adapter = True
    default_form = "lora"


__all__ = ["Lora", "LoraOptions", "export_peft", "lora_config"]
