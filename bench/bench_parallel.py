"""``ppft bench --jobs`` and ``--threads``: wall time of the same lab cells run three ways, and disk per cell.

    python bench/bench_parallel.py --out bench/results/parallel.json

A 4-cell subset of ``recipes/lab_bench.yaml`` (task ``shift``, seed 0, methods ``full`` and ``lora`` at
both learning rates; 200 steps x 32 each, as in the full bench) runs through the CLI in fresh folders,
one after another in one script: ``--jobs 1 --threads 1``, ``--jobs 2`` (cores // 2 threads per
worker) and ``--jobs 1`` with torch's default threads. Every folder starts from the same ``base.json`` so
only the cells are timed. The machine is shared: the 1-minute load average before and after each run
is recorded next to its time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBSET = [
    "--set", "bench.seeds=[0]",
    "--set", 'bench.tasks=[{name: shift, train: "lab:shift", eval: "lab:shift"}]',
    "--only", "full", "--only", "lora",
]  # fmt: skip
CONFIGS = {"jobs1_threads1": ["--threads", "1"], "jobs2": ["--jobs", "2"], "jobs1_default_threads": []}


def load() -> float:
    return os.getloadavg()[0]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def base_scores(folder: Path) -> Path:
    """The base model's scores on the subset's tasks, computed once for every configuration."""
    sys.path.insert(0, str(ROOT))
    from preserve_core.bench import BenchRunner
    from preserve_core.recipe import load_recipe

    overrides = [SUBSET[i + 1] for i, a in enumerate(SUBSET) if a == "--set"] + [f"bench.out_dir={folder}"]
    BenchRunner(load_recipe(ROOT / "recipes" / "lab_bench.yaml", overrides)).base_scores()
    return folder / "base.json"


def run_config(extra: list[str], out: Path, base: Path, env: dict) -> dict:
    out.mkdir(parents=True)
    shutil.copy(base, out / "base.json")
    cmd = [sys.executable, "-m", "cli.main", "bench", "recipes/lab_bench.yaml", *SUBSET, "--set", f"bench.out_dir={out}", *extra]
    before, start = load(), time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, load()
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/cell.json"))]
    return {
        "command": " ".join(["ppft", *cmd[3:]]),
        "wall_seconds": wall,
        "load_1min_before": before,
        "load_1min_after": after,
        "cells": {c["id"]: {"train_seconds": c["train_seconds"], "eval_seconds": c["eval_seconds"], "scores": c["scores"]} for c in cells},
        "cell_folder_bytes": {p.parent.name: folder_bytes(p.parent) for p in (out / "cells").glob("*/cell.json")},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel.json"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="Comma-separated subset of " + ", ".join(CONFIGS))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # torch's own default
    env["PYTHONPATH"] = str(ROOT)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_scores(Path(tmp) / "base")
        for name in args.configs.split(","):
            results[name] = run_config(CONFIGS[name], Path(tmp) / name, base, env)
            print(name, f"{results[name]['wall_seconds']:.0f} s", f"load {results[name]['load_1min_before']:.1f}", flush=True)
            write(Path(args.out), results)  # after each configuration: a long run stopped early keeps what it measured


def write(path: Path, results: dict) -> None:
    first = next(iter(results.values()))
    same = all(r["cells"].keys() == first["cells"].keys() and all(r["cells"][i]["scores"] == first["cells"][i]["scores"] for i in r["cells"]) for r in results.values())
    summary = {
        "cores": len(os.sched_getaffinity(0)),
        "cells": len(first["cells"]),
        "same_scores_in_every_config": same,
        "speedup_jobs2_over_jobs1_threads1": results["jobs1_threads1"]["wall_seconds"] / results["jobs2"]["wall_seconds"]
        if {"jobs1_threads1", "jobs2"} <= results.keys() else None,
        "load_note": "2 cores shared with other engineers' jobs: see load_1min_before/after of each run",
    }
    path.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
