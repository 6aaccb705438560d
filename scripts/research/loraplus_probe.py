"""Prototype of LoRA+ (Hayou et al. 2024: the B factor at a higher rate) before any product code: runs
``ppft bench <recipe> --jobs 1`` in this process with ``Method.parameter_groups`` patched so parameters
named ``*lora_B*`` train at ``RATIO`` times ``training.lr`` and weight decay ``wd / RATIO`` (the same
decoupled decay per step as A's). Every cell of the bench gets it: give it a recipe of LoRA+ rows only.

    LORAPLUS_RATIO=4 python scripts/research/loraplus_probe.py scripts/research/h61_loraplus_rotate.yaml
"""

from __future__ import annotations

import os
import sys

from preserve_core.methods.base import Method

RATIO = float(os.environ["LORAPLUS_RATIO"])


def parameter_groups(self, model, weight_decay):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = [p for n, p in named if "lora_B" in n]
    rest = [p for n, p in named if "lora_B" not in n]
    assert b, "no lora_B parameters: not an adapter method"
    lr = self.ctx.recipe.training.lr
    return [{"params": rest, "weight_decay": weight_decay},
            {"params": b, "weight_decay": weight_decay / RATIO, "lr": lr * RATIO}]  # fmt: skip


Method.parameter_groups = parameter_groups

if __name__ == "__main__":
    from cli.main import app

    sys.argv = ["ppft", "bench", sys.argv[1], "--jobs", "1", "--threads", "1"]
    app()
