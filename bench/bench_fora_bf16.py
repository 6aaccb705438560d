"""FORA's full form on bf16 weights: how much of ``dW = W_t - W_0`` lands in the protected span(Q), with
and without the projected AdamW's float32 master copy (issue 15).

One ``[m, n]`` weight at Qwen3-0.6B's MLP width (``gate_proj``: 3072 x 1024), ``W_0`` drawn as
``N(0, 0.02^2)`` (the usual init scale) and stored in bf16, ``Q`` [n, k] a random orthonormal basis
(``k = n / 2``), random gradients, AdamW for ``--steps`` steps at each ``--lr``. Everything measured
in float64 from the bf16 weights: ``||dW Q||_F``, ``||dW||_F``, their ratio, and the bound with masters,
one bf16 rounding of the master ``W~``: ``||(W_t - W~_t) Q|| <= 2^-8 ||W~_t||``. A ``dW`` blind to ``Q``
would give a ratio of about ``sqrt(k / n) = 0.71``.

    OMP_NUM_THREADS=1 python bench/bench_fora_bf16.py --out bench/results/fora_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(w0: torch.Tensor, q: torch.Tensor, lr: float, steps: int, master: bool) -> dict:
    from preserve_core.methods.fora.optim import ProjectedAdamW

    w = torch.nn.Parameter(w0.clone())
    optimizer = ProjectedAdamW([w], lr=lr, projectors={w: (q, torch.zeros(w.shape[0], 0))}, master_weights=master)
    grads = torch.Generator().manual_seed(2)
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=grads).bfloat16()
        optimizer.step()
    d_w = w.detach().double() - w0.double()
    leak, size = float((d_w @ q.double()).norm()), float(d_w.norm())
    out = {"dW_Q": leak, "dW": size, "dW_Q_over_dW": leak / size if size else None}
    if master:
        exact = optimizer.state[w]["master"].double()
        out["bound_one_rounding"] = 2.0**-8 * float(exact.norm())
        out["master_dW_Q_over_dW"] = float(((exact - w0.double()) @ q.double()).norm() / (exact - w0.double()).norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3072)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/fora_bf16.json")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    w0 = (0.02 * torch.randn(args.rows, args.cols, generator=g)).bfloat16()
    q = torch.linalg.qr(torch.randn(args.cols, args.cols // 2, generator=g, dtype=torch.float64))[0].float()
    results = {}
    for lr in args.lr:
        for master in (True, False):
            label = f"lr{lr:g}_{'master' if master else 'no_master'}"
            results[label] = run(w0, q, lr, args.steps, master)
            print(label, json.dumps(results[label]), flush=True)
    out = {"benchmark": "fora_full_bf16_leak", "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "blind_ratio": (0.5) ** 0.5, "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
