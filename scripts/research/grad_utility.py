"""Prototype (issue 12, item 2): replace a calibration folder's C_t by a gradient utility.

FoLoRA's utility of an input direction ``a`` is ``a^T C_t a``: task input energy. The first-order loss
decrease of a rank-1 update ``b a^T`` with ``|b| = 1`` is ``|G a|``, ``G = dL/dW`` ([m, n]). So the
gradient utility is ``a^T (sum_l G_l^T G_l) a`` (summed over the layers reading one input, averaged over
task batches). Usage: python grad_utility.py <recipe.resolved.yaml> <calibration dir> [batch_size]
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from preserve_core.calibration.batches import task_batches
from preserve_core.calibration.gram import pack_upper
from preserve_core.calibration.store import read_manifest
from preserve_core.models import load_model, load_tokenizer, resolve_target_modules
from preserve_core.recipe import load_recipe

recipe = load_recipe(sys.argv[1])
calib = Path(sys.argv[2])
if len(sys.argv) > 3:
    recipe.calibration.stats_batch_size = int(sys.argv[3])
manifest = read_manifest(calib)
model = load_model(recipe.model, "cpu")
tokenizer = load_tokenizer(recipe.model)
targets = resolve_target_modules(model, recipe.model.target_modules)
for p in model.parameters():
    p.requires_grad_(False)
modules = dict(model.named_modules())
for name in targets:
    modules[name].weight.requires_grad_(True)
batches, n = task_batches(recipe, tokenizer)
sums = {}
for batch in batches:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    out.loss.backward()
    for name in targets:
        key = manifest["module_to_key"][name]
        g = modules[name].weight.grad.double()
        sums[key] = sums.get(key, 0) + g.T @ g
covs = {k: pack_upper((v / len(batches)).float()) for k, v in sums.items()}
save_file(covs, str(calib / "task_stats.safetensors"))
print(f"wrote gradient C_t for {len(covs)} inputs from {n} examples in {len(batches)} batches")
