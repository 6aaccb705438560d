"""How many FoLoRA directions each task asks for: statistics of lambda per layer input, per calibration.

For each calibration folder (one per task, made with the FoLoRA-alone recipe's settings) solve
``C_t v = lambda (C_p + eps I) v`` per input key and print, summed over keys: the width, the directions a
hard gate at quantile .97 / .9 opens, the participation ratio ``(sum l)^2 / sum l^2`` of lambda, and the
directions needed to hold 50 / 80 / 90 % of ``sum lambda``. A diagnostic for a gate sized by the task.

    python scripts/research/gate_need.py NAME=CALDIR [NAME=CALDIR ...] [--damping 1e-3]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from preserve_core.calibration.store import Calibration, read_manifest
from preserve_core.methods.folora.basis import generalized_basis


def key_stats(cal: Calibration, key: str, damping: float) -> dict[str, float]:
    c_p, c_t = cal.cov_by_key("preserve", key).double(), cal.cov_by_key("task", key).double()
    n = c_p.shape[0]
    lam = generalized_basis(c_t, c_p, damping, n).values.clamp_min(0)
    share = torch.cumsum(lam, 0) / lam.sum()
    row = {"n": n, **{f"q{int(q * 100)}": int((lam >= torch.quantile(lam, q)).sum()) for q in (0.97, 0.9)}}
    row["pr"] = float(lam.sum() ** 2 / (lam**2).sum())
    for f in (0.5, 0.8, 0.9):
        row[f"m{int(f * 100)}"] = int((share < f).sum()) + 1
    row["top"] = float(lam[0])
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+")
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args()
    cols = ["n", "q97", "q90", "pr", "m50", "m80", "m90"]
    print(f"{'task':12s} " + " ".join(f"{c:>7s}" for c in cols) + "   per key pr")
    for pair in args.pairs:
        name, directory = pair.split("=", 1)
        cal = Calibration(Path(directory), read_manifest(Path(directory)))
        rows = [key_stats(cal, key, args.damping) for key in cal.keys()]
        total = {c: sum(r[c] for r in rows) for c in cols}
        per_key = " ".join(f"{r['pr']:.1f}" for r in rows)
        print(f"{name:12s} " + " ".join(f"{total[c]:7.1f}" for c in cols) + f"   {per_key}")


if __name__ == "__main__":
    main()
