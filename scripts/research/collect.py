"""Collect `ppft bench` cells into one JSONL and print mean +- std over seeds per (task, label, lr).

Usage: python scripts/research/collect.py [CELLS_DIR | results.json ...] [--jsonl OUT] [--filter SUBSTR]
Each row of the table: new-task exact match, mean retention (relative to base is NOT applied: raw
accuracy, base ~100% on every old skill except count 98.3), the worst old skill, over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

OLD = ["reverse", "sort", "recall", "cycle", "count"]


def load_cells(dirs: list[Path]) -> list[dict]:
    raw = []
    for d in dirs:  # a bench's cells/ folder, or a results.json (its "cells")
        if d.suffix == ".json":
            raw += [dict(c, label=f"main:{c['label']}") for c in json.loads(d.read_text())["cells"]]
        else:
            raw += [json.loads(p.read_text()) for p in sorted(d.glob("*/cell.json"))]
    cells = []
    for cell in raw:
        if True:
            s = cell["scores"]
            old = [100 * s[k]["score"] for k in OLD if k in s]
            cells.append({"id": cell["id"], "task": cell["task"], "label": cell["label"], "lr": cell["lr"],
                          "seed": cell["seed"], "method": cell["method"], "new": 100 * s[cell["task"]]["score"],
                          "kept": sum(old) / len(old), "min_old": min(old),
                          "old": {k: 100 * s[k]["score"] for k in OLD if k in s},
                          "kl": s.get("kl_to_base", {}).get("score"), "train_s": cell.get("train_seconds")})
    return cells


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:5.1f} ± {std:4.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="*", default=["runs/research/cells"])
    ap.add_argument("--jsonl", default="runs/research/cells.jsonl")
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    cells = load_cells([Path(d) for d in args.dirs])
    Path(args.jsonl).write_text("".join(json.dumps(c) + "\n" for c in cells))
    groups = defaultdict(list)
    for c in cells:
        if args.filter in c["label"]:
            groups[(c["task"], c["label"], c["lr"])].append(c)
    print(f"| task | label | lr | seeds | new | kept | min old | worst skills (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for (task, label, lr), cs in sorted(groups.items()):
        per_skill = {k: statistics.fmean(c["old"][k] for c in cs) for k in cs[0]["old"]}
        worst = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_skill.items(), key=lambda kv: kv[1])[:2])
        print(f"| {task} | {label} | {lr:g} | {len(cs)} | {fmt([c['new'] for c in cs])} | "
              f"{fmt([c['kept'] for c in cs])} | {fmt([c['min_old'] for c in cs])} | {worst} |")


if __name__ == "__main__":
    main()
