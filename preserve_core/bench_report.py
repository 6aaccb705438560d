"""Aggregating bench cells: results.json, a Markdown table and the learning-vs-forgetting (Pareto) plot.

For each (task, method, lr), scores are averaged over seeds. The new-task standard error is the
binomial one of the pooled accuracy; the preserve mean's is ``sqrt(sum_i se_i^2) / k`` over the k
preserve tasks (independent binomials). Beside them, the seed-to-seed spread: the per-seed scores'
mean, sample standard deviation (``n - 1``) and minimum (``seed_spread``). A point is
Pareto-optimal within its task when no other point has both a higher new-task accuracy and a
higher preserve mean.

Tasks marked ``held_out`` (``bench.tasks[].held_out``, listed in ``settings["held_out"]``) are not
used to pick a method's learning rate: :func:`split_summary` picks it on the other ("tuned on")
tasks and reports both groups at that rate.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .runs import write_atomic


def _pooled(scores: list[dict]) -> dict:
    n = sum(s["n"] for s in scores)
    p = sum(s["score"] * s["n"] for s in scores) / n if n else float("nan")
    se = math.sqrt(p * (1 - p) / n) if n and 0 <= p <= 1 else None
    return {"score": p, "n": n, "stderr": se}


def seed_spread(values: list[float]) -> dict:
    """``{"mean", "std", "min", "per_seed"}`` of per-seed scores; ``std`` is the sample one (None for one seed)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "per_seed": values}


def _seed_spreads(task: str, members: list[dict], preserve_names: list[str]) -> dict:
    members = sorted(members, key=lambda m: m["seed"])
    spread = {"new_task": seed_spread([m["scores"][task]["score"] for m in members])}
    if preserve_names:
        means = [sum(m["scores"][n]["score"] for n in preserve_names) / len(preserve_names) for m in members]
        spread["preserve_mean"] = seed_spread(means)
    return spread


def aggregate(cells: list[dict], preserve_names: list[str]) -> list[dict]:
    """One row per (task, label, lr): new-task accuracy, preserve mean, per-skill accuracy, KL, each with se."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[(cell["task"], cell["label"], cell["lr"])].append(cell)
    rows = []
    for (task, label, lr), members in groups.items():
        target = _pooled([m["scores"][task] for m in members])
        skills = {name: _pooled([m["scores"][name] for m in members]) for name in preserve_names}
        mean = sum(s["score"] for s in skills.values()) / len(skills) if skills else float("nan")
        ses = [s["stderr"] for s in skills.values() if s["stderr"] is not None]
        kl = [m["scores"]["kl_to_base"]["score"] for m in members if "kl_to_base" in m["scores"]]
        rows.append(
            {
                "task": task, "method": label, "lr": lr, "seeds": sorted(m["seed"] for m in members),
                "new_task": target, "preserve_mean": {"score": mean, "stderr": math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None},
                "preserve": skills, "kl_to_base": sum(kl) / len(kl) if kl else None,
                "train_seconds": sum(m["train_seconds"] for m in members) / len(members),
                "seed_spread": _seed_spreads(task, members, preserve_names),
                "worst_preserve": min((s["score"] for s in skills.values()), default=None),
            }
        )  # fmt: skip
    mark_pareto(rows)
    return sorted(rows, key=lambda r: (r["task"], r["method"], r["lr"]))


def mark_pareto(rows: list[dict]) -> None:
    for row in rows:
        x, y = row["preserve_mean"]["score"], row["new_task"]["score"]
        row["pareto"] = not any(
            o is not row and o["task"] == row["task"] and o["preserve_mean"]["score"] >= x and o["new_task"]["score"] >= y
            and (o["preserve_mean"]["score"] > x or o["new_task"]["score"] > y)
            for o in rows
        )  # fmt: skip


def best_per_method(rows: list[dict]) -> list[dict]:
    """Per (task, method), the lr with the highest mean of new-task accuracy and preserve mean."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["task"], row["method"])
        value = (row["new_task"]["score"] + row["preserve_mean"]["score"]) / 2
        if key not in best or value > best[key]["balanced"]:
            best[key] = {**row, "balanced": value}
    return sorted(best.values(), key=lambda r: (r["task"], -r["balanced"]))


def split_summary(rows: list[dict], held_out: list[str]) -> list[dict]:
    """Per method: the lr with the best mean of ``(new + preserve mean) / 2`` over the tuned-on tasks
    (all tasks when none is tuned on), then, at that lr, per group (``tuned``, ``held_out``): the mean
    and the worst task's new-task and preserve-mean accuracy, and the lowest single preserved skill."""
    summary = []
    tuned_names = sorted({r["task"] for r in rows} - set(held_out))
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        pick_from = [r for r in mine if r["task"] in tuned_names] or mine

        def balanced(lr: float, pick_from=pick_from) -> float:
            chosen = [r for r in pick_from if r["lr"] == lr]
            return sum((r["new_task"]["score"] + r["preserve_mean"]["score"]) / 2 for r in chosen) / len(chosen)

        lr = max(sorted({r["lr"] for r in pick_from}), key=balanced)
        entry = {"method": method, "lr": lr, "lr_picked_on": "tuned" if tuned_names else "all"}
        for group, names in (("tuned", tuned_names), ("held_out", sorted(set(held_out)))):
            at = [r for r in mine if r["lr"] == lr and r["task"] in names]
            entry[group] = _group(at) if at else None
        summary.append(entry)
    return summary


def _group(rows: list[dict]) -> dict:
    new = [r["new_task"]["score"] for r in rows]
    kept = [r["preserve_mean"]["score"] for r in rows]
    worst = [r["worst_preserve"] for r in rows if r.get("worst_preserve") is not None]
    return {
        "tasks": [r["task"] for r in rows], "new_mean": sum(new) / len(new), "new_min": min(new),
        "preserve_mean": sum(kept) / len(kept), "preserve_min": min(kept), "worst_skill": min(worst) if worst else None,
    }  # fmt: skip


def _spread_pct(d: dict | None) -> str:
    if not d:
        return "-"
    std = f" ± {100 * d['std']:.1f}" if d.get("std") is not None else ""
    return f"{100 * d['mean']:.1f}{std} (min {100 * d['min']:.1f})"


def _pct(d: dict | None) -> str:
    if not d or d.get("score") is None or math.isnan(d["score"]):
        return "-"
    se = f" ± {100 * d['stderr']:.1f}" if d.get("stderr") is not None else ""
    return f"{100 * d['score']:.1f}{se}"


def summary_markdown(summary: list[dict], held_out: list[str]) -> list[str]:
    out = [
        "## Tuned on vs held out",
        "",
        f"Held-out tasks (not used to pick a method's learning rate): {', '.join(held_out) or 'none'}. Per method, the lr "
        "with the best mean of (new task + preserve mean) / 2 over the tuned-on tasks, and at that lr: the mean over a "
        "group's tasks / its worst task, and the lowest single preserved skill (percent).",
        "",
        "| method | lr | tuned: new (worst) | tuned: kept (worst) | held out: new (worst) | held out: kept (worst) | lowest skill held out |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in sorted(summary, key=lambda e: -((e["held_out"] or e["tuned"] or {}).get("preserve_mean", 0))):
        cells = [e["method"], f"{e['lr']:g}"]
        for group in ("tuned", "held_out"):
            g = e[group]
            cells += [f"{100 * g['new_mean']:.1f} ({100 * g['new_min']:.1f})", f"{100 * g['preserve_mean']:.1f} ({100 * g['preserve_min']:.1f})"] if g else ["-", "-"]
        worst = (e["held_out"] or {}).get("worst_skill")
        cells.append(f"{100 * worst:.1f}" if worst is not None else "-")
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def markdown(rows: list[dict], base: dict, preserve_names: list[str], settings: dict) -> str:
    head = ["method", "lr", "new task", "preserve mean", "new task over seeds", "preserve mean over seeds",
            *preserve_names, "KL to base", "Pareto"]  # fmt: skip
    out = [
        "# Bench results",
        "",
        f"Settings: {json.dumps(settings)}",
        "",
        "Accuracies in percent (exact match, ± one standard error of the pooled binomial). 'preserve mean' averages "
        "the preserved skills. '... over seeds': the per-seed scores' mean ± sample standard deviation (min over seeds).",
        "",
    ]
    held_out = list(settings.get("held_out", []))
    out += summary_markdown(split_summary(rows, held_out), held_out)
    for task in sorted({r["task"] for r in rows}):
        out += [f"## New task: {task}", "", f"Base model: new task {_pct(base.get(task))}, "
                + ", ".join(f"{n} {_pct(base.get(n))}" for n in preserve_names), ""]  # fmt: skip
        out += ["### Best learning rate per method (max of the mean of new-task and preserve-mean accuracy)", ""]
        out += _table(head, [r for r in best_per_method(rows) if r["task"] == task], preserve_names)
        out += ["### Every cell", ""]
        out += _table(head, [r for r in rows if r["task"] == task], preserve_names)
    return "\n".join(out) + "\n"


def _table(head: list[str], rows: list[dict], preserve_names: list[str]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        kl = f"{r['kl_to_base']:.4f}" if r["kl_to_base"] is not None else "-"
        spread = r.get("seed_spread", {})
        cells = [r["method"], f"{r['lr']:g}", _pct(r["new_task"]), _pct(r["preserve_mean"])]
        cells += [_spread_pct(spread.get("new_task")), _spread_pct(spread.get("preserve_mean"))]
        cells += [_pct(r["preserve"][n]) for n in preserve_names] + [kl, "yes" if r["pareto"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


PLOT_COLUMNS = 4  # panels per row of the Pareto plot


def pareto_plot(rows: list[dict], base: dict, path: Path, held_out: list[str] = ()) -> None:
    """One panel per task (rows of ``PLOT_COLUMNS``): x = preserve mean accuracy, y = new-task accuracy;
    Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.cm.tab20((2 * i) % 20 + (2 * i // 20) % 2) for i, m in enumerate(methods)}  # unpaired hues first
    markers = {m: "osD^vPX*<>"[i % 10] for i, m in enumerate(methods)}
    cols = min(len(tasks), PLOT_COLUMNS)
    grid_rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(6.5 * cols, 5.2 * grid_rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task]
        for m in methods:
            pts = [r for r in mine if r["method"] == m]
            ax.scatter([100 * r["preserve_mean"]["score"] for r in pts], [100 * r["new_task"]["score"] for r in pts],
                       color=colors[m], marker=markers[m], label=m, s=40, edgecolors="black", linewidths=0.4)  # fmt: skip
        front = sorted((r for r in mine if r["pareto"]), key=lambda r: r["preserve_mean"]["score"])
        ax.plot([100 * r["preserve_mean"]["score"] for r in front], [100 * r["new_task"]["score"] for r in front], "k--", lw=1, label="Pareto front")
        if task in base:
            ax.axhline(100 * base[task]["score"], color="grey", lw=0.8, ls=":", label="base (new task)")
        ax.set_title(f"new task: {task}" + (" (held out)" if task in held_out else ""))
        ax.set_xlabel("preserved skills, mean exact match (%)  → less forgetting")
        ax.set_ylabel("new task exact match (%)  → more learning")
        ax.grid(alpha=0.3)
    axes.flat[len(tasks) - 1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def gather_cells(out: Path, plan_ids: list[str], ran_now: set[str]) -> tuple[list[dict], dict[str, int]]:
    """Every planned cell with a result, in plan order, so a partial run (``--only``) merges into the full table.

    A cell's result is its ``cells/<id>/cell.json``, else its copy in the previous ``results.json``
    (the cells folder may be gone, e.g. in a fresh clone). Cells no longer planned (a method removed or
    its options edited) are dropped. Counts: ``run_now``, ``on_disk`` (finished before),
    ``from_results`` (previous results.json only), ``not_run``, ``dropped``.
    """
    path = out / "results.json"
    previous = {c["id"]: c for c in json.loads(path.read_text()).get("cells", [])} if path.exists() else {}
    cells, counts = [], dict.fromkeys(("run_now", "on_disk", "from_results", "not_run"), 0)
    for cell_id in plan_ids:
        cell_file = out / "cells" / cell_id / "cell.json"
        if cell_file.exists():
            cells.append(json.loads(cell_file.read_text()))
            counts["run_now" if cell_id in ran_now else "on_disk"] += 1
        elif cell_id in previous:
            cells.append(previous[cell_id])
            counts["from_results"] += 1
        else:
            counts["not_run"] += 1
    counts["dropped"] = len(set(previous) - set(plan_ids))
    return cells, counts


def describe_rebuild(out: Path, counts: dict[str, int]) -> str:
    """One sentence: which files were rebuilt from which cells."""
    used = counts["run_now"] + counts["on_disk"] + counts["from_results"]
    text = (
        f"rebuilt {out}/results.md, results.json and pareto.png from {used} of {used + counts['not_run']} planned cells "
        f"({counts['run_now']} run now, {counts['on_disk']} finished before, {counts['from_results']} kept from the previous results.json)"
    )
    if counts["not_run"]:
        text += f"; {counts['not_run']} not run yet (ppft bench without --only runs them)"
    if counts["dropped"]:
        text += f"; {counts['dropped']} cells of the previous results.json are no longer in the recipe and were left out"
    return text


def write_results(out: Path, cells: list[dict], base: dict, preserve_names: list[str], settings: dict) -> list[dict]:
    rows = aggregate(cells, preserve_names)
    summary = split_summary(rows, list(settings.get("held_out", [])))
    blob = {"settings": settings, "base": base, "summary": summary, "rows": rows, "cells": cells}
    write_atomic(out / "results.json", json.dumps(blob, indent=2))
    write_atomic(out / "results.md", markdown(rows, base, preserve_names, settings))
    pareto_plot(rows, base, out / "pareto.png", list(settings.get("held_out", [])))
    return rows
