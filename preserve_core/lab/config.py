"""Lab presets: model shape and pretraining budget per size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

LAB_VERSION = 1  # bump when generators, tokenizer or training change: old caches stop matching


@dataclass(frozen=True)
class LabConfig:
    """One lab build. ``layers/hidden/mlp/heads``: the Llama shape; ``steps/batch_size/lr``: pretraining."""

    size: str
    layers: int
    hidden: int
    mlp: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    n_train: int = 2000  # per-skill training rows written for fine-tuning
    n_eval: int = 240  # per-skill held-out eval rows
    n_preserve_mix: int = 2000  # rows of data/preserve_mix (label-free text of the pretraining skills)

    def key(self, seed: int) -> str:
        """Cache key: a hash of everything that changes the build."""
        blob = json.dumps({**asdict(self), "seed": seed, "version": LAB_VERSION}, sort_keys=True)
        return f"{self.size}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


PRESETS: dict[str, LabConfig] = {
    # the embedded default: a few minutes on 2 CPU cores
    "tiny": LabConfig("tiny", layers=4, hidden=128, mlp=512, heads=4, steps=2000, batch_size=64, lr=3e-3),
    # twice tiny's width, same depth and head size: does protection by projection get easier with width?
    # 815 s on 2 idle CPU cores, every pretraining skill >= 0.996 (docs/lab.md; 2,000 steps at 2e-3 left count at 0.71)
    "wide": LabConfig("wide", layers=4, hidden=256, mlp=1024, heads=8, steps=2800, batch_size=64, lr=1.5e-3),
    # a larger variant for a GPU
    "small": LabConfig("small", layers=8, hidden=512, mlp=2048, heads=8, steps=6000, batch_size=128, lr=1e-3),
    # for tests: seconds, and skills only partly learned
    "micro": LabConfig("micro", layers=2, hidden=48, mlp=128, heads=4, steps=150, batch_size=32, lr=5e-3, n_train=200, n_eval=40, n_preserve_mix=100),
}
