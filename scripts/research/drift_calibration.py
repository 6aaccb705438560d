"""Prototype (issue 12, item 2, FoLoRA alone): a preserve covariance that knows where the inputs drift.

FoLoRA's later layers read the preserve inputs as the tuned model's earlier layers have moved them, and
those moved inputs are 7-22x leakier than the base inputs its C_p measured (ablations section 17). Here a
pilot run (the same recipe, trained once) says where they go: C_p is re-measured on the pilot's tuned model
over the calibration's own preserve sequences, and the folder's C_p becomes (C_p base + C_p tuned) / 2. A
second run from the base model then solves FoLoRA's quotient against both. The folder is changed in place:
copy it first. Usage: python drift_calibration.py RECIPE_RESOLVED_YAML PILOT_FINAL_DIR CALIBRATION_DIR
"""
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file

from preserve_core.calibration.batches import preserve_batches
from preserve_core.calibration.gram import pack_upper
from preserve_core.calibration.stats import current_covs
from preserve_core.calibration.store import Calibration, read_manifest
from preserve_core.models import load_model, load_tokenizer, resolve_target_modules
from preserve_core.recipe import load_recipe

recipe = load_recipe(Path(sys.argv[1]))
calib_dir = Path(sys.argv[3])
calibration = Calibration(calib_dir, read_manifest(calib_dir))
tokenizer = load_tokenizer(recipe.model)
base = load_model(recipe.model, "cpu")
targets = resolve_target_modules(base, recipe.model.target_modules)
tuned = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload().eval()
sequences = calibration.preserve_sequences(tokenizer, recipe.data.max_length)
batches = preserve_batches(sequences, tokenizer, recipe.data.max_length, 32)
names = list(dict.fromkeys(targets))
first = {}
for name in names:
    first.setdefault(calibration.input_key(name), name)
out = {}
for readers, c_tuned in current_covs(tuned, list(first.values()), batches, torch.device("cpu")):
    key = calibration.input_key(readers[0])
    c_base = calibration.cov_by_key("preserve", key).double()
    ratio = float(torch.trace(c_tuned.double())) / float(torch.trace(c_base))
    out[key] = pack_upper(((c_base + c_tuned.double()) / 2).float())
    print(f"{key}: tr(C_p tuned) / tr(C_p base) = {ratio:.3f}", flush=True)
missing = set(calibration.keys()) - set(out)
assert not missing, f"no tuned C_p for {sorted(missing)}"
save_file(out, str(calib_dir / "preserve_stats.safetensors"))
print(f"wrote (C_p base + C_p tuned) / 2 for {len(out)} inputs over {len(sequences)} preserve sequences")
