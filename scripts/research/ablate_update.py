"""Which part of a trained adapter forgets? Switch groups of its LoRA layers off and re-score.

For each group (one decoder layer, one projection kind, attention vs MLP), the adapter's ``lora_B``
is zeroed on that group only ("without") or on everything else ("only"), and the target task and
the preserve tasks of the run's recipe are scored again. Usage:
    python ablate_update.py RECIPE_RESOLVED_YAML RUN_FINAL_DIR
"""
import sys
from pathlib import Path

import torch
from peft import PeftModel

from preserve_core.evaluation.suite import evaluate_suite
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe

recipe = load_recipe(Path(sys.argv[1]))
tokenizer = load_tokenizer(recipe.model)
model = PeftModel.from_pretrained(load_model(recipe.model, "cpu"), sys.argv[2]).eval()
layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})}
saved = {n: m.lora_B["default"].weight.detach().clone() for n, m in layers.items()}
tasks = recipe.eval.target + recipe.eval.preserve


def score(keep) -> str:
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_B["default"].weight.copy_(saved[n] if keep(n) else torch.zeros_like(saved[n]))
    res = evaluate_suite(model, tokenizer, tasks, 256)
    return "  ".join(f"{k} {100 * r.score:5.1f}" for k, r in res.items())


groups = {f"layer{i}": f"layers.{i}." for i in range(4)}
groups |= {k: f"{k}_proj" for k in ("q", "k", "v", "o", "gate", "up", "down")}
groups |= {"attn": "self_attn", "mlp": ".mlp."}
print(f"{'all':>14}: {score(lambda n: True)}")
for g, pat in groups.items():
    print(f"{'without ' + g:>14}: {score(lambda n: pat not in n)}")
    print(f"{'only ' + g:>14}: {score(lambda n: pat in n)}")
