"""``ppft compare``: several evaluated runs side by side, and their learning-vs-forgetting plot.

Reads ``<run>/eval/report.json`` (written by ``ppft eval``) of each run; writes ``comparison.md``,
``comparison.json`` and ``learning_vs_forgetting.png`` into the output folder. x = mean score of the
preserved capabilities, y = mean score of the target tasks: up and to the right is better. The base
model is plotted too (the same for every run, checked).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .bench_report import mark_pareto, pareto_plot
from .errors import RecipeError
from .runs import write_atomic


def load_run(run_dir: Path) -> dict:
    """The report of one evaluated run, labelled by its method (``label`` = run folder name if repeated)."""
    report_path = run_dir / "eval" / "report.json"
    if not report_path.exists():
        raise RecipeError(f"{run_dir}: no eval/report.json; run `ppft eval <recipe>` for this run first")
    report = json.loads(report_path.read_text())
    recipe_path = run_dir / "recipe.resolved.yaml"
    method = yaml.safe_load(recipe_path.read_text())["method"]["name"] if recipe_path.exists() else "?"
    return {"run": str(run_dir), "method": method, "report": report}


def _suite_mean(tasks: list[dict], suite: str, key: str) -> dict:
    chosen = [t for t in tasks if t["suite"] == suite and t[key] is not None and t["unit"] == "fraction"]
    if not chosen:
        return {"score": float("nan"), "stderr": None}
    ses = [t["stderr_delta"] or 0.0 for t in chosen]
    return {"score": sum(t[key] for t in chosen) / len(chosen), "stderr": math.sqrt(sum(s * s for s in ses)) / len(ses)}


def comparison_rows(runs: list[dict]) -> tuple[list[dict], dict]:
    """One row per run in bench-report form (``new_task``, ``preserve_mean``, ``preserve``), and the base."""
    labels = [r["method"] for r in runs]
    targets = ", ".join(t["name"] for t in runs[0]["report"]["tasks"] if t["suite"] == "target") or "target"
    rows = []
    for run, label in zip(runs, labels, strict=True):
        tasks = run["report"]["tasks"]
        rows.append({
            "task": targets, "method": label if labels.count(label) == 1 else Path(run["run"]).name,
            "run": run["run"], "lr": None,
            "new_task": _suite_mean(tasks, "target", "tuned"), "preserve_mean": _suite_mean(tasks, "preserve", "tuned"),
            "preserve": {t["name"]: {"score": t["tuned"], "stderr": None} for t in tasks if t["suite"] == "preserve"},
            "mean_retention": run["report"]["summary"]["mean_retention"],
        })  # fmt: skip
    first = runs[0]["report"]["tasks"]
    base = {"target": _suite_mean(first, "target", "base"), "preserve_mean": _suite_mean(first, "preserve", "base")}
    mark_pareto(rows)
    return rows, base


def markdown(rows: list[dict], base: dict) -> str:
    names = list(rows[0]["preserve"])
    head = ["run", "new task", "preserve mean", "mean retention", *names, "Pareto"]
    lines = ["# Comparison", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| base | " + f"{100 * base['target']['score']:.1f} | {100 * base['preserve_mean']['score']:.1f} | 1.000 | "
        + " | ".join("" for _ in names) + " | |"
    )
    for r in rows:
        retention = f"{r['mean_retention']:.3f}" if r["mean_retention"] is not None else "-"
        cells = [r["method"], f"{100 * r['new_task']['score']:.1f}", f"{100 * r['preserve_mean']['score']:.1f}", retention]
        cells += [f"{100 * r['preserve'][n]['score']:.1f}" for n in names] + ["yes" if r["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Scores in percent (exact match); retention = tuned / base, averaged."]) + "\n"


def compare_runs(run_dirs: list[Path], out_dir: Path) -> list[dict]:
    if not run_dirs:
        raise RecipeError("compare: give at least one run folder")
    runs = [load_run(Path(d)) for d in run_dirs]
    fingerprints = {r["report"]["base_fingerprint"] for r in runs}
    if len(fingerprints) > 1:
        raise RecipeError("compare: the runs were evaluated against different base models; compare runs of one model")
    rows, base = comparison_rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "comparison.json", json.dumps({"base": base, "rows": rows}, indent=2))
    write_atomic(out_dir / "comparison.md", markdown(rows, base))
    pareto_plot(rows, {rows[0]["task"]: base["target"]}, out_dir / "learning_vs_forgetting.png")
    return rows


def render_table(rows: list[dict], width: int | None = None):
    """The console table: run, new task, preserve mean, retention, Pareto; each preserved skill too when wide."""
    from .tables import is_wide, make_table

    names = list(rows[0]["preserve"]) if rows and is_wide(width) else []
    table = make_table("learning vs forgetting (%)", ["run", "new task", "kept mean", "retention", *names, "Pareto"], width)
    for r in rows:
        retention = f"{r['mean_retention']:.3f}" if r["mean_retention"] is not None else "-"
        skills = [f"{100 * r['preserve'][n]['score']:.1f}" for n in names]
        table.add_row(r["method"], f"{100 * r['new_task']['score']:.1f}", f"{100 * r['preserve_mean']['score']:.1f}",
                      retention, *skills, "yes" if r["pareto"] else "")  # fmt: skip
    return table
