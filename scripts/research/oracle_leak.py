"""How much of the old skills' real input energy each calibration's FORA ``Q`` leaves unprotected.

Usage: python scripts/research/oracle_leak.py ORACLE_CAL CAL [CAL ...]   (calibration cell folders)
For every statistics block (one input covariance ``C`` [n, n] per shared layer input), ``Q`` [n, k] is
the top-``k`` eigenvectors of the calibration's ``C`` with ``k`` chosen as FORA does (energy .999,
max_rank .97); the leak is ``1 - tr(Q^T C_o Q) / tr(C_o)`` with ``C_o`` the oracle's covariance: the
fraction of the real old-skill input energy in directions the update may use. Prints mean / median /
max over blocks and the free directions ``sum(n - k)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from preserve_core.calibration.stats import unpack_symmetric
from preserve_core.methods.fora.bases import select_rank


def covariances(cal: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, packed in load_file(str(cal / "preserve_stats.safetensors")).items():
        n = int(((8 * packed.numel() + 1) ** 0.5 - 1) / 2)  # packed upper triangle: n (n + 1) / 2 entries
        out[name] = unpack_symmetric(packed.double(), n)
    return out


def main() -> None:
    oracle = covariances(Path(sys.argv[1]))
    for cal in map(Path, sys.argv[2:]):
        leaks, free, total = [], 0, 0
        for name, cov in covariances(cal).items():
            values, vectors = torch.linalg.eigh(cov)
            values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
            k = select_rank(values, 0.999, None, 0.97)
            q, c_o = vectors[:, :k], oracle[name]
            leaks.append(float(1 - torch.trace(q.T @ c_o @ q) / torch.trace(c_o)))
            free, total = free + cov.shape[0] - k, total + cov.shape[0]
        t = torch.tensor(leaks)
        print(f"{cal}: oracle energy left free mean {100 * t.mean():.2f}% median {100 * t.median():.2f}% "
              f"max {100 * t.max():.2f}%; free directions {free}/{total}")


if __name__ == "__main__":
    main()
