"""Evaluation results and the base-versus-tuned report: data classes, a rich table, JSON and Markdown.

Units decide how a change is expressed in *points* (positive = better):

- ``fraction`` (accuracies, exact match): ``100 * (tuned - base)``, percentage points;
- ``ratio`` (perplexity and other positive scores): the relative change in percent,
  ``100 * (tuned - base) / base``, sign-flipped when lower is better;
- ``nats`` (``kl_to_base``): no points and no retention; reported, never gated.

Retention is ``tuned / base`` when higher is better and ``base / tuned`` when lower is better,
so 1.0 means kept and below 1.0 means lost, whatever the metric.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table  # noqa: TC002 (the return type)

from .runs import write_atomic


@dataclass
class TaskResult:
    """One model's score on one task. ``n``: examples (accuracies) or scored tokens (perplexity, KL)."""

    name: str
    kind: str
    metric: str
    score: float
    n: int
    stderr: float | None = None
    higher_is_better: bool = True
    unit: str = "fraction"
    extra: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskResult:
        return cls(**data)


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` over ``n`` examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else 0.0


def retention(base: TaskResult, tuned: TaskResult) -> float | None:
    """tuned/base (higher is better) or base/tuned (lower is better); None for KL or a zero denominator."""
    if base.unit == "nats":
        return None
    num, den = (tuned.score, base.score) if base.higher_is_better else (base.score, tuned.score)
    return num / den if den else None


def change_points(base: TaskResult, tuned: TaskResult) -> tuple[float | None, float | None]:
    """``(points, stderr of points)``, positive = better; see the module docstring for units."""
    sign = 1.0 if base.higher_is_better else -1.0
    se = None
    if base.stderr is not None and tuned.stderr is not None:
        se = math.sqrt(base.stderr**2 + tuned.stderr**2)
    if base.unit == "fraction":
        return sign * 100.0 * (tuned.score - base.score), (100.0 * se if se is not None else None)
    if base.unit == "ratio" and base.score:
        scale = 100.0 / abs(base.score)
        return sign * scale * (tuned.score - base.score), (scale * se if se is not None else None)
    return None, None


@dataclass
class TaskComparison:
    """One task, base against tuned. ``delta = tuned - base`` in the metric's own unit."""

    suite: str
    name: str
    kind: str
    metric: str
    unit: str
    higher_is_better: bool
    base: float
    tuned: float
    delta: float
    stderr_delta: float | None
    points: float | None
    stderr_points: float | None
    retention: float | None
    regressed: bool
    base_cached: bool
    n: int
    extra: dict[str, dict[str, float]] = field(default_factory=dict)


def compare(
    suite: str, base: TaskResult, tuned: TaskResult, threshold: float | None, base_cached: bool
) -> TaskComparison:
    points, se_points = change_points(base, tuned)
    se_delta = None
    if base.stderr is not None and tuned.stderr is not None:
        se_delta = math.sqrt(base.stderr**2 + tuned.stderr**2)
    regressed = suite == "preserve" and threshold is not None and points is not None and points < -threshold
    return TaskComparison(
        suite=suite, name=tuned.name, kind=tuned.kind, metric=tuned.metric, unit=tuned.unit,
        higher_is_better=tuned.higher_is_better, base=base.score, tuned=tuned.score,
        delta=tuned.score - base.score, stderr_delta=se_delta, points=points, stderr_points=se_points,
        retention=retention(base, tuned), regressed=regressed, base_cached=base_cached, n=tuned.n,
        extra={"base": base.extra, "tuned": tuned.extra},
    )  # fmt: skip


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class Report:
    """What ``ppft eval`` found. ``new_task_gain``: mean points over target tasks; ``mean_retention``: over preserve."""

    recipe: str
    base_model: str
    checkpoint: str
    checkpoint_kind: str
    base_fingerprint: str
    tasks: list[TaskComparison]
    fail_on_regression: float | None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    samples: dict[str, dict[str, list[dict]]] = field(default_factory=dict)

    @property
    def new_task_gain(self) -> float | None:
        return _mean([t.points for t in self.tasks if t.suite == "target"])

    @property
    def mean_retention(self) -> float | None:
        return _mean([t.retention for t in self.tasks if t.suite == "preserve"])

    @property
    def regressions(self) -> list[TaskComparison]:
        return [t for t in self.tasks if t.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = {
            "new_task_gain_points": self.new_task_gain,
            "mean_retention": self.mean_retention,
            "regressions": [t.name for t in self.regressions],
            "passed": self.passed,
        }
        return data


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def format_score(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    return f"{value:.4f}" if unit == "nats" else f"{value:.3f}"


def format_points(t: TaskComparison) -> str:
    if t.points is None:
        return f"{t.delta:+.4f}"
    suffix = " pts" if t.unit == "fraction" else "%"
    return f"{t.points:+.1f}{suffix}"


def format_stderr(t: TaskComparison) -> str:
    if t.stderr_points is not None:
        return f"±{t.stderr_points:.1f}"
    return f"±{t.stderr_delta:.4f}" if t.stderr_delta is not None else "-"


def _status(t: TaskComparison) -> str:
    return "REGRESSED" if t.regressed else "ok"


def _row(t: TaskComparison) -> list[str]:
    ret = f"{t.retention:.3f}" if t.retention is not None else "-"
    base = format_score(t.base, t.unit) + (" (cached)" if t.base_cached else "")
    return [
        t.suite,
        t.name,
        t.metric,
        base,
        format_score(t.tuned, t.unit),
        format_points(t),
        format_stderr(t),
        ret,
        _status(t),
    ]


HEADERS = ["suite", "task", "metric", "base", "tuned", "change", "± se", "retention", "status"]


def summary_lines(report: Report) -> list[str]:
    gain, kept = report.new_task_gain, report.mean_retention
    lines = [
        f"new-task gain: {gain:+.1f} points (mean over target tasks)" if gain is not None else "new-task gain: -",
        f"mean retention: {kept:.3f} (over preserve tasks)" if kept is not None else "mean retention: -",
    ]
    if report.fail_on_regression is not None:
        verdict = "passed" if report.passed else "FAILED: " + ", ".join(t.name for t in report.regressions)
        lines.append(f"regression gate ({report.fail_on_regression:g} points): {verdict}")
    return lines


def _narrow_row(t: TaskComparison) -> list[str]:
    """suite, task, base (``*`` = cached), tuned, change ± se, retention, status: fits 80 columns.

    The change drops the ``pts`` suffix (the header says points; ratio units keep their ``%``)."""
    change = format_points(t).removesuffix(" pts") + ("" if format_stderr(t) == "-" else f" {format_stderr(t)}")
    ret = f"{t.retention:.3f}" if t.retention is not None else "-"
    base = format_score(t.base, t.unit) + ("*" if t.base_cached else "")
    return [t.suite, t.name, base, format_score(t.tuned, t.unit), change, ret, _status(t)]


NARROW_HEADERS = ["suite", "task", "base", "tuned", "pts ± se", "kept", "status"]


def render_table(report: Report, width: int | None = None) -> Table:
    """One row per task, regressions in red. Under ``tables.WIDE_AT`` columns: no metric column, the
    change and its standard error in one cell, ``*`` marking a cached base score (report.md has it all)."""
    from .tables import is_wide, make_table

    wide = is_wide(width)
    caption = summary_lines(report)
    if not wide and any(t.base_cached for t in report.tasks):
        caption.append("* base score from the cache")
    title = f"ppft eval: {report.recipe if wide else Path(report.recipe).name}"
    table = make_table(title, HEADERS if wide else NARROW_HEADERS, width, "\n".join(caption), left=3 if wide else 2)
    for t in report.tasks:
        table.add_row(*(_row(t) if wide else _narrow_row(t)), style="red" if t.regressed else None)
    return table


def render_markdown(report: Report) -> str:
    lines = [
        f"# ppft eval: {report.recipe}",
        "",
        f"- base model: `{report.base_model}` (fingerprint `{report.base_fingerprint}`)",
        f"- tuned: `{report.checkpoint}` ({report.checkpoint_kind})",
        f"- created: {report.created}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(t)) + " |" for t in report.tasks]
    lines += [""] + [f"- {line}" for line in summary_lines(report)]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_atomic(json_path, json.dumps(report.to_dict(), indent=2, default=str))
    write_atomic(md_path, render_markdown(report))
    return json_path, md_path
