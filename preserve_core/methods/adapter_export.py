"""Save arbitrary low-rank factors as a stock PEFT LoRA adapter.

Any method whose update of a linear layer ``y = W x`` is exactly a product ``dW = B A``
(``A`` of shape ``[r, n]``, ``B`` of shape ``[m, r]``, ranks may differ per layer) can ship it in
PEFT's adapter format with scaling 1 (``lora_alpha = r``), so ``PeftModel.from_pretrained`` on the
unmodified base model reproduces ``W + B A``. FORA's LoRA form and FoLoRA both export through here.

Files written in ``out_dir``: ``adapter_config.json`` (a ``peft.LoraConfig``: ``target_modules`` =
the full module names; ``rank_pattern``/``alpha_pattern`` when ranks differ),
``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``,
float32) and the tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

PEFT_PREFIX = "base_model.model."


def save_lora_factors_as_peft(
    out_dir: str | Path,
    base_model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    tokenizer,
    base_model_name_or_path: str | None,
) -> Path:
    """Write ``{module_name: (A [r, n], B [m, r])}`` as a PEFT adapter with ``dW = B A`` per module.

    ``module_name`` is the full dotted name of an ``nn.Linear`` of ``base_model`` (the unwrapped
    model's naming, e.g. ``model.layers.0.self_attn.q_proj``). ``tokenizer`` may be None.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {name: _check_factors(base_model, name, a, b) for name, (a, b) in factors.items()}
    config = _lora_config(ranks, base_model_name_or_path)
    config.save_pretrained(str(out_dir))
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _own_copy(a)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _own_copy(b)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """Float32, contiguous, on the CPU, in its own storage: layers reading one input may share one ``A``,
    and safetensors refuses tensors that share memory."""
    return t.detach().float().cpu().clone(memory_format=torch.contiguous_format)


def _lora_config(ranks: dict[str, int], base_model_name_or_path: str | None) -> LoraConfig:
    """Scaling 1 everywhere: ``lora_alpha = r`` and, per differing layer, ``alpha_pattern = rank_pattern``."""
    if not ranks:
        raise ValueError("no factors to export")
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        target_modules=list(ranks),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )


def _check_factors(base_model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor) -> int:
    module = base_model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{name}: not a linear layer of the base model")
    m, n = weight.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n or b.shape[0] != m or a.shape[0] != b.shape[1]:
        raise ValueError(f"{name}: factors A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a [{m}, {n}] weight as B @ A")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: rank-0 factors cannot be stored as a LoRA; leave the module out")
    return int(a.shape[0])
