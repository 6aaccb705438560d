"""Summarise the performance benchmarks (bench/results/*.json) as one Markdown file.

    python bench/summarize.py            # writes bench/results/performance.md and prints it

Each section reads one file written by a bench script; a missing file is reported, not invented.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def train_section(data: dict) -> list[str]:
    s = data["settings"]
    return markdown_table(
        ["ppft tokens/s", "HF Trainer tokens/s", "ratio", "target"],
        [[f"{data['ppft_tokens_per_s']:.0f}", f"{data['hf_trainer_tokens_per_s']:.0f}", f"{data['ratio_ppft_over_hf']:.2f}", data["target"]]],
        f"ppft `train` (lora) vs Hugging Face `Trainer` + PEFT, hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']}, "
        f"{s['steps']} steps, best of {s['repeats']} interleaved repeats:",
    )


def packing_section(data: dict) -> list[str]:
    s, t = data["settings"], data["tokens_per_s"]
    return markdown_table(
        ["HF Trainer", "HF Trainer, group_by_length", "ppft padded", "ppft packed", "packed / HF", "packed / HF grouped", "target"],
        [[*(f"{t[k]:.0f}" for k in ("hf_trainer", "hf_trainer_group_by_length", "ppft_padded", "ppft_packed")),
          f"{data['ratio_ppft_packed_over_hf_trainer']:.2f}", f"{data['ratio_ppft_packed_over_hf_group_by_length']:.2f}", ">= 1.2"]],
        f"lora on a length mix ({s['lengths']}), hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']}, "
        f"{s['steps']} steps, best of {s['repeats']} interleaved repeats, {s.get('clock', 'wall')} clock, "
        f"{s['torch_threads']} thread(s); tokens/s of real (non-padding) tokens:",
    )  # fmt: skip


def methods_section(data: dict) -> list[str]:
    s = data["settings"]
    rows = []
    for label, r in data["methods"].items():
        if "error" in r:
            rows.append([label, f"error: {r['error'][:60]}", "", "", ""])
            continue
        ratio = f"{r['step_time_ratio']:.2f}" if "step_time_ratio" in r else "-"
        rows.append([label, f"{r['step_seconds_median']:.3f}", r.get("reference", "-"), ratio, f"{r['peak_rss_mb']:.0f}"])
    return markdown_table(
        ["method", "step (s)", "vs", "ratio", "peak RSS (MB)"], rows,
        f"Step time (median) and peak RSS per method, hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']}, "
        f"{s['steps']} steps, each method in its own process:",
    )  # fmt: skip


def calibration_section(data: dict) -> list[str]:
    rows = [[name, f"{c['stats']['ratio_median']:.2f}", f"{c['sampling']['throughput_ratio']:.2f}"] for name, c in data["configs"].items()]
    for name, c in data.get("real_widths", {}).items():
        ratios = ", ".join(f"{label} {c[label]['ratio_median']:.2f}" for label in ("adaptive", "blocks4") if label in c)
        rows.append([f"{name} (real widths; Gram row blocks: {ratios}; target <= 1.1)", "", "-"])
    return markdown_table(
        ["model", "statistics vs plain forward (time ratio, target <= 1.25)", "sampling vs bare generate (throughput ratio, target >= 0.8)"], rows
    )


MEMORY_KEYS = {
    "calibration_disk": "calibration on disk",
    "stats_peak": "accumulating C_p: peak",
    "stats_held": "accumulating C_p: sums held",
    "setup_held": "set-up: bases held",
    "setup_peak": "set-up peak",
    "checkpoint_disk": "checkpoint on disk",
}


def memory_section(data: dict) -> list[str]:
    """Measured vs predicted (bench/memory_model.py), MiB, per shape, depth and method."""
    rows = []
    for run in data["runs"]:
        where = [run["shape"], str(run["layers"]), run["method"]]
        for key, label in MEMORY_KEYS.items():
            c = run["comparison"].get(key)
            if c is None or c["measured"] is None or not c["predicted"]:
                continue
            rows.append([*where, label, f"{c['measured'] / 2**20:.1f}", f"{c['predicted'] / 2**20:.1f}", f"{c['ratio']:.2f}",
                         "yes" if c["within_15pct"] else "no"])  # fmt: skip
        m = run["measured"]
        if "setup_cpu_seconds" in m:
            rows.append([*where, "set-up CPU time (s)", f"{m['setup_cpu_seconds']:.0f}", "", "", ""])
    return markdown_table(["shape", "layers", "method", "quantity", "measured (MiB)", "predicted (MiB)", "ratio", "within 15%"], rows)


def eval_section(data: dict) -> list[str]:
    return markdown_table(
        ["ppft cold (s)", "ppft warm (s)", "lm-eval (s)", "ratio cold", "ratio warm", "target"],
        [[*(f"{data[k]:.2f}" for k in ("ppft_cold_s", "ppft_warm_s", "lm_eval_s", "ratio_cold", "ratio_warm")), "<= 1.0"]],
        f"exact_match on {data['suite']['rows']} rows, batch {data['suite']['batch_size']}: "
        f"generations identical to lm-eval: {data['generations_identical']}",
    )


def parallel_section(data: dict) -> list[str]:
    s = data["summary"]
    rows = []
    for name, r in data["runs"].items():
        cells = list(r["cells"].values())
        per_cell = sum(c["train_seconds"] + c["eval_seconds"] for c in cells) / len(cells)
        kb = sum(r["cell_folder_bytes"].values()) / len(r["cell_folder_bytes"]) / 1024
        rows.append([name, f"{r['wall_seconds']:.0f}", f"{per_cell:.0f}", f"{r['load_1min_before']:.1f} / {r['load_1min_after']:.1f}", f"{kb:.0f}"])
    lines = markdown_table(
        ["configuration", "wall (s)", "mean cell train + eval (s)", "load before / after", "KB per finished cell"], rows,
        f"{s['cells']} lab cells (200 steps x 32 each), {s['cores']} cores shared with other jobs (1-minute load average "
        f"before/after each run); same scores in every configuration: {s['same_scores_in_every_config']}",
    )  # fmt: skip
    if s.get("speedup_jobs2_over_jobs1_threads1"):
        lines += ["", f"Speed-up of --jobs 2 over --jobs 1 --threads 1: {s['speedup_jobs2_over_jobs1_threads1']:.2f}x"]
    return lines


def guards_section(data: dict) -> list[str]:
    s = data["settings"]
    return markdown_table(
        ["finiteness guard / step", "checksums / checkpoint save"],
        [[f"{data['guard_fraction_of_step']:.3f}", f"{data['checksum_fraction_of_save']:.2f}"]],
        f"Full fine-tuning, hidden {s['hidden']}, {s['layers']} layers, batch {s['batch']}, {s['steps']} steps; "
        f"each cost timed inside the same run as what it is compared with, best of {s['repeats']}:",
    )


def regularizers_section(data: dict) -> list[str]:
    s = data["settings"]
    return markdown_table(
        ["step without (s)", "step with (s)", "ratio of medians", "median of paired ratios"],
        [[f"{data[k]:.3f}" for k in ("without_seconds_median", "with_seconds_median")]
         + [f"{data[k]:.2f}" for k in ("ratio_with_over_without", "ratio_of_pairs_median")]],
        f"method {s['method']} with regularizers {s['regularizers']} vs without, A/B-interleaved steps in one process "
        f"(hidden {s['hidden']}, batch {s['batch']}, {s['steps']} steps each, load average {s['loadavg'][0]:.1f}):",
    )  # fmt: skip


SECTIONS = [
    ("Training throughput", "train.json", train_section, "python bench/bench_train.py"),
    ("Training throughput on a length mix (data.packing)", "packing.json", packing_section, "python bench/bench_packing.py"),
    ("Method step time and memory", "methods.json", methods_section, "python bench/bench_methods.py"),
    ("Regulariser cost on top of a method", "regularizers.json", regularizers_section, "python bench/bench_regularizers.py"),
    ("Calibration overhead", "calibration.json", calibration_section, "python bench/bench_calibration.py"),
    ("Run-safety checks (docs/reliability.md)", "guards.json", guards_section, "python bench/bench_guards.py"),
    ("Memory and disk at real widths", "memory.json", memory_section, "python bench/bench_memory.py"),
    ("Evaluation vs lm-evaluation-harness", "eval.json", eval_section, "python bench/bench_eval.py (needs ppft[lmeval])"),
    ("Parallel bench cells and threads", "parallel.json", parallel_section, "python bench/bench_parallel.py"),
]


def main() -> int:
    lines = ["# Performance benchmarks", "", "Ratios measured side by side in one run on the same machine (CPU unless noted).", ""]
    for title, name, render, command in SECTIONS:
        lines += [f"## {title}", "", f"`{command}` -> `bench/results/{name}`", ""]
        data = _load(name)
        lines += (render(data) if data else ["(not run yet)"]) + [""]
        for extra in sorted(RESULTS.glob(name.replace(".json", "_*.json"))):  # variants, e.g. another batch size
            lines += [f"Variant `{extra.name}` ({json.dumps(_load(extra.name).get('settings', {}))}):", ""]
            lines += render(_load(extra.name)) + [""]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "performance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
