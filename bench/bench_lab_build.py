"""Pretraining step time of lab presets, side by side, and the build time it implies.

Runs ``--steps`` pretraining steps of each preset (random init, the real batch and sequence mix),
interleaved over ``--repeats`` rounds in one process with the same threads, and reports the median
step time per preset, its ratio to ``tiny``'s and ``ratio x tiny's measured idle build``: an
estimate of a preset's build time on an idle machine from a run on a loaded one.

    python bench/bench_lab_build.py --presets tiny,wide --out bench/results/lab_build.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
from common import REPO, write_result

TINY_IDLE_PRETRAIN_SECONDS = 153.6  # docs/lab.md: tiny, 2 threads, idle machine (CI run)


def step_times(size: str, steps: int, seed: int) -> list[float]:
    from preserve_core.lab.config import PRESETS
    from preserve_core.lab.pretrain import build_model, sample_batch
    from preserve_core.lab.tokenizer import build_tokenizer

    cfg, tokenizer = PRESETS[size], build_tokenizer()
    model = build_model(cfg, len(tokenizer), seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    rng, times = random.Random(seed), []
    for _ in range(steps):
        batch = sample_batch(rng, tokenizer, cfg.batch_size, set())
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,wide")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/lab_build.json")
    args = parser.parse_args()
    from preserve_core.lab.config import PRESETS

    presets = args.presets.split(",")
    times: dict[str, list[float]] = {p: [] for p in presets}
    for repeat in range(args.repeats):
        for size in presets:
            times[size] += step_times(size, args.steps, repeat)
    median = {p: statistics.median(t) for p, t in times.items()}
    results = {
        p: {"step_seconds_median": median[p], "steps": PRESETS[p].steps, "ratio_to_tiny": median[p] / median["tiny"],
            "estimated_idle_pretrain_seconds": TINY_IDLE_PRETRAIN_SECONDS * median[p] / median["tiny"]}
        for p in presets
    }  # fmt: skip
    load = os.getloadavg()
    write_result(args.out, {"benchmark": "lab_build", "settings": {**vars(args), "out": str(args.out),
                 "torch_threads": torch.get_num_threads(), "loadavg": load}, "presets": results})  # fmt: skip


if __name__ == "__main__":
    main()
