"""Does forgetting fall faster than learning when the trained update is shortened? (WiSE-FT for an adapter.)

Scales every ``lora_B`` of a trained adapter by ``s`` (so ``dW -> s dW``, the weights ``W0 + s dW`` on the
line from the base to the tuned model) and re-scores the target and preserve tasks. Usage:
    python scale_update.py RECIPE_RESOLVED_YAML RUN_FINAL_DIR [s ...]
"""
import sys
from pathlib import Path

import torch
from peft import PeftModel

from preserve_core.evaluation.suite import evaluate_suite
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe

recipe = load_recipe(Path(sys.argv[1]))
scales = [float(s) for s in sys.argv[3:]] or [0.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
tokenizer = load_tokenizer(recipe.model)
model = PeftModel.from_pretrained(load_model(recipe.model, "cpu"), sys.argv[2]).eval()
layers = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})]
saved = [m.lora_B["default"].weight.detach().clone() for m in layers]
target = {t.name for t in recipe.eval.target}
for s in scales:
    with torch.no_grad():
        for m, b in zip(layers, saved):
            m.lora_B["default"].weight.copy_(s * b)
    res = evaluate_suite(model, tokenizer, recipe.eval.target + recipe.eval.preserve, 256)
    kept = [100 * r.score for k, r in res.items() if k not in target]
    line = "  ".join(f"{k} {100 * r.score:5.1f}" for k, r in res.items())
    print(f"s {s:4.2f}: {line}  | preserve mean {sum(kept) / len(kept):5.1f}", flush=True)
