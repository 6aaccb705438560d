"""The console summary of a bench: per new task, each method at its best learning rate (80 columns)."""

from __future__ import annotations

import math

from rich.table import Table

from .bench_report import best_per_method
from .tables import is_wide, make_table


def _pct(d: dict | None, se: bool) -> str:
    if not d or d.get("score") is None or math.isnan(d["score"]):
        return "-"
    tail = f" ±{100 * d['stderr']:.1f}" if se and d.get("stderr") is not None else ""
    return f"{100 * d['score']:.1f}{tail}"


def render_summary(rows: list[dict], width: int | None = None) -> Table:
    """task, method, lr, new-task and preserve-mean accuracy (± se when wide), Pareto: one row per method."""
    wide = is_wide(width)
    headers = ["task", "method", "lr", "new task", "kept mean", *(["KL"] if wide else []), "Pareto"]
    table = make_table("bench: best lr per method (accuracy %)", headers, width, "every cell: results.md", left=2)
    for r in best_per_method(rows):
        kl = [f"{r['kl_to_base']:.4f}" if r.get("kl_to_base") is not None else "-"] if wide else []
        table.add_row(r["task"], r["method"], f"{r['lr']:g}", _pct(r["new_task"], wide), _pct(r["preserve_mean"], wide),
                      *kl, "yes" if r["pareto"] else "")  # fmt: skip
    return table
