"""Step time and peak memory of every registered method, side by side, on one random-init model.

Each method runs in its own subprocess (so peak RSS is its own) on the same random-init Llama,
data, batch and steps; calibration, when a method needs it, happens before the timed steps and is
reported separately. Ratios: adapter methods versus ``lora``, full-weight methods versus ``full``.

    python bench/bench_methods.py --out bench/results/methods.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, bench_parser, save_model, write_recipe, write_result
from conftest import reverse_examples, write_jsonl


def method_sections() -> dict[str, dict]:
    """One representative configuration per registered method (rank 8 where there is a rank)."""
    from preserve_core.methods import METHODS

    sections = {}
    for name, cls in METHODS.items():
        fields = cls.Options.model_fields
        section = {"name": name}
        for key in ("r", "rank"):
            if key in fields:
                section[key] = 8
        sections[name] = section
    spec = {"u_energy": 0.5, "spectral_size": 8}  # FORA's U_1 and channel as measured in docs/results.md
    for name in ("fora", "weightproj"):
        if name in sections:
            sections[name].update(spec)
            sections[f"{name}_full"] = {"name": name, "form": "full", **spec}
    if "fora" in sections:  # the full form without the spectral channel's per-token path
        sections["fora_full_s0"] = {"name": "fora", "form": "full", "spectral_size": 0}
    if "fora" in sections:  # composition: the cost of a regulariser on top of FORA
        sections["fora_full_kl"] = {"name": "fora", "form": "full", **spec, "regularizers": [{"name": "kl"}]}
        sections["fora_full_replay"] = {"name": "fora", "form": "full", **spec, "regularizers": [{"name": "replay", "rho": 0.1}]}
        sections["fora_lora_kl"] = {"name": "fora", "r": 8, **spec, "regularizers": [{"name": "kl"}]}
    if "folora" in sections:  # one refresh every 10 steps: its cost shows in step_seconds_max
        sections["folora_refresh"] = {"name": "folora", "r": 8, "refresh_every": 10, "refresh_window": 4}
    return sections


def reference_for(section: dict) -> str:
    """``full`` for methods that train the weights themselves (a ``form: full`` or a non-adapter), else ``lora``."""
    from preserve_core.methods import METHODS

    cls = METHODS[section["name"]]
    form_field = cls.Options.model_fields.get("form")
    form = section.get("form", form_field.default if form_field is not None else None)
    full_weight = form == "full" if form is not None else not cls.is_adapter
    return "full" if full_weight else "lora"


def child(recipe_path: str) -> None:
    """Runs in the subprocess: train, then print step times and peak RSS as JSON."""
    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    start = time.perf_counter()
    result = train(load_recipe(recipe_path), show_progress=False)
    steps = [m["step_seconds"] for m in result.metrics if "step_seconds" in m]
    warm = steps[len(steps) // 5 :]
    print(json.dumps({
        "step_seconds_median": statistics.median(warm), "step_seconds_mean": statistics.fmean(warm), "step_seconds_max": max(warm),
        "total_seconds": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def write_fixture(root: Path, hidden: int, layers: int, rows: int) -> tuple[Path, Path]:
    """``(model folder, task.jsonl)`` of ``rows`` reversal rows, and ``preserve.jsonl`` (256 other rows as text)."""
    model = save_model(root, hidden, layers)
    write_jsonl(root / "preserve.jsonl", [{"text": r["prompt"] + r["completion"]} for r in reverse_examples(256, seed=9)])
    return model, write_jsonl(root / "task.jsonl", reverse_examples(rows))


def recipe_for(root: Path, model: Path, data: Path, label: str, section: dict, steps: int, batch: int) -> Path:
    return write_recipe(root / f"{label}.yaml", {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data), "max_length": 64},
        "method": section,
        "training": {"lr": 1e-4, "max_steps": steps, "batch_size": batch, "log_every": 1},
        "calibration": {"preserve_source": "dataset", "preserve_data": str(root / "preserve.jsonl"), "num_samples": 64},
        "output": {"dir": str(root / f"run-{label}"), "overwrite": True},
    })  # fmt: skip


def run_round(root: Path, model: Path, data: Path, sections: dict, args) -> dict:
    """Every section once, one after another, each in its own process."""
    results = {}
    for label, section in sections.items():
        path = recipe_for(root, model, data, label, section, args.steps, args.batch)
        proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            results[label] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(label, results[label], flush=True)
    return results


def combine_rounds(rounds: list[dict], sections: dict) -> dict:
    """Per method: the median over rounds of its median step time (max peak RSS); its ratio to the
    reference is the median over rounds of the ratio within a round (neighbours in time share the
    machine's load, so interleaved rounds make ratios robust to a load that drifts)."""
    results = {}
    for label in sections:
        runs = [r[label] for r in rounds]
        if any("error" in run for run in runs):
            results[label] = next(run for run in runs if "error" in run)
            continue
        results[label] = {
            "step_seconds_median": statistics.median(run["step_seconds_median"] for run in runs),
            "step_seconds_max": max(run["step_seconds_max"] for run in runs),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "rounds": len(runs),
        }
        ref = reference_for(sections[label])
        if ref in sections and all("error" not in r[ref] for r in rounds):
            ratios = [r[label]["step_seconds_median"] / r[ref]["step_seconds_median"] for r in rounds]
            results[label].update(reference=ref, step_time_ratio=statistics.median(ratios), step_time_ratio_per_round=ratios)
    return results


def main() -> None:
    parser = bench_parser(__doc__, REPO / "bench/results/methods.json", steps=30, hidden=512)
    parser.add_argument("--repeats", type=int, default=1, help="Rounds over all methods, interleaved; medians over rounds")
    parser.add_argument("--only", help="Comma-separated labels to run (default: every method), e.g. lora,full,fora")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    sections = method_sections()
    if args.only:
        sections = {label: s for label, s in sections.items() if label in args.only.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = write_fixture(root, args.hidden, args.layers, rows=args.batch * args.steps)
        rounds = [run_round(root, model, data, sections, args) for _ in range(args.repeats)]
    results = combine_rounds(rounds, sections)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    write_result(args.out, {"benchmark": "method_step_time", "settings": settings, "methods": results})


if __name__ == "__main__":
    main()
