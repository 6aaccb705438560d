"""How much of each task's input energy FORA's protection reaches: per calibration folder, summed over the
layer inputs, the share of ``tr(C_t)`` inside ``Q`` (``C_p``'s top eigenvectors at ``energy`` / ``max_rank``)
and the shrink-weighted share outside it, ``sum_i (1 - s_i) v_i^T C_t v_i / tr(C_t)`` with FORA's
``s_i = (1 + strength * lambda_i / mean lambda)^(-1/2)``: what residual_shrink takes from a task step.

    python scripts/research/task_overlap.py NAME=CALDIR [...] [--strength 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from preserve_core.calibration.store import Calibration, read_manifest
from preserve_core.methods.fora.bases import select_rank


def overlap(cal: Calibration, key: str, strength: float) -> tuple[float, float, float]:
    c_p, c_t = cal.cov_by_key("preserve", key).double(), cal.cov_by_key("task", key).double()
    values, vectors = torch.linalg.eigh(c_p)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    k = select_rank(values, 0.99, None, 0.9)
    task = ((c_t @ vectors) * vectors).sum(0)  # v_i^T C_t v_i, descending lambda order
    shrink = 1 - (1 + strength * values[k:] / values.mean()).rsqrt()
    return float(task[:k].sum()), float((shrink * task[k:]).sum()), float(task.sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+")
    parser.add_argument("--strength", type=float, default=100.0)
    args = parser.parse_args()
    print(f"{'task':12s} {'in Q':>7s} {'shrunk':>7s} {'free':>7s}")
    for pair in args.pairs:
        name, directory = pair.split("=", 1)
        cal = Calibration(Path(directory), read_manifest(Path(directory)))
        parts = [overlap(cal, key, args.strength) for key in cal.keys()]
        q, shrunk, total = (sum(p[i] for p in parts) for i in range(3))
        print(f"{name:12s} {q / total:7.3f} {shrunk / total:7.3f} {(total - q - shrunk) / total:7.3f}")


if __name__ == "__main__":
    main()
