"""Prototype (issue 12, item 2, FoLoRA alone): C_t as the mean of its loss-position and all-position estimates.

``task_positions: all`` (C_t over every task token) let FoLoRA read the prompt that tells a new task from
an old one (h41), but on tasks with a one-token answer the prompt outweighs the answer ~10:1 and learning
fell (countd). Here each of the two estimates counts half: C_t = (C_loss + C_all) / 2. Writes a copy of the
all-positions folder (its identity, so a bench with task_positions: all reuses it) with that C_t.
Usage: python mix_task_positions.py LOSS_CALIBRATION_DIR ALL_CALIBRATION_DIR OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

loss_dir, all_dir, out_dir = (Path(a) for a in sys.argv[1:4])
loss, every = load_file(str(loss_dir / "task_stats.safetensors")), load_file(str(all_dir / "task_stats.safetensors"))
assert loss.keys() == every.keys(), "the two folders hold different inputs"
same_preserve = all(torch.equal(a, b) for a, b in zip(load_file(str(loss_dir / "preserve_stats.safetensors")).values(),
                                                       load_file(str(all_dir / "preserve_stats.safetensors")).values()))
assert same_preserve, "the two folders' C_p differ: they are not the same calibration but for task_positions"
shutil.rmtree(out_dir, ignore_errors=True)
shutil.copytree(all_dir, out_dir)
save_file({k: (loss[k].double() / 2 + every[k].double() / 2).float() for k in loss}, str(out_dir / "task_stats.safetensors"))
print(f"{out_dir}: C_t = (C_loss + C_all) / 2 for {len(loss)} inputs")
