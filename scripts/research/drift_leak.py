"""Does a trained adapter's leak compound through depth? Per LoRA layer, the output change
``|dW x|^2`` summed over the preserve calibration tokens, with ``x`` the layer's input in the base
model (adapter off: what FORA's ``Q`` was measured on) and in the tuned model (adapter on: what the
layer actually reads once the layers before it have changed), each relative to ``|W_0 x_base|^2``.
Usage: python drift_leak.py RECIPE_RESOLVED_YAML RUN_FINAL_DIR [N_SEQUENCES]
"""
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch
from peft import PeftModel

from preserve_core.calibration.batches import preserve_batches
from preserve_core.calibration.store import Calibration, read_manifest
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe

recipe = load_recipe(Path(sys.argv[1]))
n_seq = int(sys.argv[3]) if len(sys.argv) > 3 else 256
tok = load_tokenizer(recipe.model)
model = PeftModel.from_pretrained(load_model(recipe.model, "cpu"), sys.argv[2]).eval()
cal_dir = Path(recipe.calibration.dir)
seqs = Calibration(cal_dir, read_manifest(cal_dir)).preserve_sequences(tok, recipe.data.max_length)[:n_seq]
batches = preserve_batches(seqs, tok, recipe.data.max_length, 32)
layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
          if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})}


def sums(adapter_on: bool) -> tuple[dict, dict]:
    """Per layer: sum over real preserve tokens of |dW x|^2 and of |W_0 x|^2, x as the layer sees it."""
    change, base_out, mask = defaultdict(float), defaultdict(float), {}

    def hook(mod, args, name):
        x = args[0][mask["now"]]
        d = mod.lora_B["default"](mod.lora_A["default"](x)) * mod.scaling["default"]
        change[name] += float((d.double() ** 2).sum())
        base_out[name] += float((mod.base_layer(x).double() ** 2).sum())

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in layers.items()]
    with torch.no_grad(), (contextlib.nullcontext() if adapter_on else model.disable_adapter()):
        for b in batches:
            mask["now"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return change, base_out


base_change, base_out = sums(False)
tuned_change, _ = sums(True)
print(f"{'layer':40} {'leak@base x':>12} {'leak@tuned x':>13} {'ratio':>7}")
for name in layers:
    lb, lt = base_change[name] / base_out[name], tuned_change[name] / base_out[name]
    print(f"{name:40} {lb:12.2e} {lt:13.2e} {lt / lb:7.1f}")
