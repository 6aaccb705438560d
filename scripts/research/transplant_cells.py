"""Copy research cells into a bench's cells folder under the id that bench's row gives them.

A research bench that set weight decay in the recipe's ``training:`` made cells whose ids hash the method
only; a bench row with its own ``training:`` hashes both. This copies each finished cell of ``--label`` in
SRC whose resolved recipe has exactly the row's training settings (checked) to DEST under the row's id,
and relabels it. Usage:
    python transplant_cells.py SRC_CELLS DEST_BENCH_RECIPE --label OLD --row NEW
"""
import argparse
import json
import shutil
from pathlib import Path

import yaml

from preserve_core.bench import plan_cells
from preserve_core.recipe import load_recipe

parser = argparse.ArgumentParser()
parser.add_argument("src", type=Path)
parser.add_argument("recipe")
parser.add_argument("--label", required=True)
parser.add_argument("--row", required=True)
args = parser.parse_args()
recipe = load_recipe(args.recipe)
dest = Path(recipe.bench.out_dir) / "cells"
copied = 0
for cell in (c for c in plan_cells(recipe) if c.label == args.row):
    matches = list(args.src.glob(f"{cell.task}__{args.label}__lr{cell.lr:g}__s{cell.seed}__*/cell.json"))
    matches = [m for m in matches if json.loads(m.read_text())["method"] == cell.method]
    if not matches or (dest / cell.id).exists():
        continue
    (source,) = matches
    trained = yaml.safe_load((source.parent / "recipe.resolved.yaml").read_text())["training"]
    wrong = {k: (trained[k], v) for k, v in cell.training.items() if trained[k] != v}
    assert not wrong, f"{source.parent.name}: trained with other settings {wrong}"
    shutil.copytree(source.parent, dest / cell.id)
    record = json.loads(source.read_text())
    record.update(id=cell.id, label=cell.label, training=cell.training)
    (dest / cell.id / "cell.json").write_text(json.dumps(record, indent=2))
    copied += 1
print(f"copied {copied} cells of {args.label} to {dest} as {args.row}")
