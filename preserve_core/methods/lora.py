"""``lora``: plain LoRA through PEFT; exports a stock PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from .base import Method, MethodOptions


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead.")


def lora_config(options, target_modules: list[str], **extra) -> LoraConfig:
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        use_rslora=options.use_rslora,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def export_peft(model: nn.Module, out_dir: Path, tokenizer, merge: bool, base_ref: str) -> None:
    """Save a PEFT model as a stock adapter in ``out_dir``; with ``merge`` also full weights in ``out_dir/merged``.

    ``base_ref`` is recorded as the adapter's ``base_model_name_or_path`` (what
    ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads the base from).
    """
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_ref
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "merged")


class Lora(Method):
    name = "lora"
    Options = LoraOptions
    is_adapter = True

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return get_peft_model(model, lora_config(self.options, self.ctx.target_modules))

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        export_peft(model, out_dir, tokenizer, merge, self.base_ref)
