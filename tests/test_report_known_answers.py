"""``preserve_core.report`` by hand: stderr, retention, points, the comparison, the report's summary and its text.

Every expected value below is worked out on paper from the definitions in the module docstring
(points, retention, units), not by calling the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich import box

from preserve_core.report import (
    HEADERS,
    NARROW_HEADERS,
    Report,
    TaskComparison,
    TaskResult,
    _mean,
    _narrow_row,
    _row,
    _status,
    binomial_stderr,
    change_points,
    compare,
    format_points,
    format_score,
    format_stderr,
    render_markdown,
    render_table,
    retention,
    summary_lines,
    write_report,
)


def result(score, stderr=None, higher=True, unit="fraction", name="t", n=10, extra=None) -> TaskResult:
    return TaskResult(name, "exact_match", "em", score, n, stderr, higher, unit, extra or {})


def comparison(suite="preserve", name="t", unit="fraction", points=-12.5, se_points=2.5, delta=-0.125, se_delta=0.025,
               ret=0.8, regressed=False, cached=False, base=0.625, tuned=0.5) -> TaskComparison:  # fmt: skip
    return TaskComparison(
        suite=suite, name=name, kind="exact_match", metric="em", unit=unit, higher_is_better=True, base=base,
        tuned=tuned, delta=delta, stderr_delta=se_delta, points=points, stderr_points=se_points, retention=ret,
        regressed=regressed, base_cached=cached, n=8,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# TaskResult, binomial_stderr, retention
# ---------------------------------------------------------------------------------------------
def test_task_result_round_trips_through_its_dict():
    r = TaskResult("a", "perplexity", "perplexity", 3.5, 7, 0.25, False, "ratio", {"nll": 1.25}, [{"x": 1}], 2.0)
    data = r.to_dict()
    assert data == {"name": "a", "kind": "perplexity", "metric": "perplexity", "score": 3.5, "n": 7, "stderr": 0.25,
                    "higher_is_better": False, "unit": "ratio", "extra": {"nll": 1.25}, "samples": [{"x": 1}],
                    "seconds": 2.0}  # fmt: skip
    assert TaskResult.from_dict(json.loads(json.dumps(data))) == r
    defaults = TaskResult("b", "exact_match", "em", 0.5, 4)
    assert (defaults.stderr, defaults.higher_is_better, defaults.unit, defaults.extra, defaults.samples,
            defaults.seconds) == (None, True, "fraction", {}, [], 0.0)  # fmt: skip


@pytest.mark.parametrize(
    ("p", "n", "expected"),
    [(0.25, 12, 0.125), (0.5, 1, 0.5), (1.0, 9, 0.0), (0.0, 9, 0.0), (0.5, 0, 0.0), (0.36, 100, 0.048)],
)
def test_binomial_stderr_by_hand(p, n, expected):
    """sqrt(p (1 - p) / n): 0.25 * 0.75 / 12 = 1/64 -> 0.125; 0.36 * 0.64 / 100 = 0.002304 -> 0.048; n = 0 -> 0."""
    assert binomial_stderr(p, n) == pytest.approx(expected, abs=1e-15)


def test_retention_by_hand():
    assert retention(result(0.8), result(0.6)) == pytest.approx(0.75)  # tuned / base
    assert retention(result(4.0, higher=False, unit="ratio"), result(5.0, higher=False, unit="ratio")) == 0.8
    assert retention(result(5.0, higher=False, unit="ratio"), result(0.0, higher=False, unit="ratio")) is None
    assert retention(result(0.0), result(0.5)) is None
    assert retention(result(1.0, unit="nats"), result(2.0, unit="nats")) is None  # KL: no retention
    assert retention(result(1.0, higher=False, unit="nats"), result(2.0, higher=False, unit="nats")) is None


# ---------------------------------------------------------------------------------------------
# change_points and compare
# ---------------------------------------------------------------------------------------------
def test_change_points_of_fractions_are_percentage_points():
    """0.5 -> 0.75 is +25 points; se = 100 * sqrt(0.03^2 + 0.04^2) = 5."""
    points, se = change_points(result(0.5, 0.03), result(0.75, 0.04))
    assert points == pytest.approx(25.0) and se == pytest.approx(5.0)
    points, se = change_points(result(0.5, 0.03, higher=False), result(0.75, 0.04, higher=False))
    assert points == pytest.approx(-25.0) and se == pytest.approx(5.0)  # lower is better: a rise is a loss
    assert change_points(result(0.5, 0.03), result(0.75, None)) == (pytest.approx(25.0), None)
    assert change_points(result(0.5, None), result(0.75, 0.04)) == (pytest.approx(25.0), None)


def test_change_points_of_ratios_are_percent_of_the_base():
    """Perplexity 10 -> 12 (lower is better): -100 * 2 / 10 = -20 %; se = 10 * sqrt(0.3^2 + 0.4^2) = 5."""
    points, se = change_points(result(10.0, 0.3, False, "ratio"), result(12.0, 0.4, False, "ratio"))
    assert points == pytest.approx(-20.0) and se == pytest.approx(5.0)
    points, se = change_points(result(-4.0, 0.6, True, "ratio"), result(-2.0, 0.8, True, "ratio"))
    assert points == pytest.approx(50.0) and se == pytest.approx(25.0)  # scale 100 / |-4| = 25
    assert change_points(result(10.0, None, False, "ratio"), result(12.0, 0.8, False, "ratio"))[1] is None
    assert change_points(result(0.0, 0.1, False, "ratio"), result(1.0, 0.1, False, "ratio")) == (None, None)
    assert change_points(result(0.1, 0.1, False, "nats"), result(0.3, 0.1, False, "nats")) == (None, None)


def test_compare_fills_every_field_by_hand():
    base = result(0.625, 0.03, extra={"acc_norm": 0.5}, n=99)
    tuned = TaskResult("task", "multiple_choice", "acc", 0.5, 8, 0.04, True, "fraction", {"acc_norm": 0.25})
    c = compare("preserve", base, tuned, 10.0, True)
    assert c == TaskComparison(
        suite="preserve", name="task", kind="multiple_choice", metric="acc", unit="fraction", higher_is_better=True,
        base=0.625, tuned=0.5, delta=-0.125, stderr_delta=pytest.approx(0.05), points=pytest.approx(-12.5),
        stderr_points=pytest.approx(5.0), retention=0.8, regressed=True, base_cached=True, n=8,
        extra={"base": {"acc_norm": 0.5}, "tuned": {"acc_norm": 0.25}},
    )  # fmt: skip
    assert compare("preserve", base, tuned, 12.5, False).regressed is False  # exactly at the threshold passes
    assert compare("preserve", base, tuned, 12.4, False).regressed is True
    assert compare("target", base, tuned, 0.0, False).regressed is False  # targets are never gated
    assert compare("preserve", base, tuned, None, False).regressed is False
    assert compare("preserve", result(0.5, None), result(0.25, 0.1), 1.0, False).stderr_delta is None
    assert compare("preserve", result(0.5, 0.1), result(0.25, None), 1.0, False).stderr_delta is None
    kl = compare("preserve", result(0.0, 0.1, False, "nats"), result(5.0, 0.1, False, "nats"), 0.0, False)
    assert kl.points is None and kl.regressed is False and kl.retention is None  # KL is reported, never gated
    assert kl.higher_is_better is False and kl.unit == "nats"


# ---------------------------------------------------------------------------------------------
# Report summary
# ---------------------------------------------------------------------------------------------
def test_mean_skips_missing_values():
    assert _mean([1.0, None, 2.0]) == 1.5 and _mean([None]) is None and _mean([]) is None and _mean([0.0]) == 0.0


def make_report(fail_on_regression=5.0) -> Report:
    tasks = [
        comparison("target", "new", points=30.0, ret=1.5),
        comparison("target", "new2", points=None, ret=None),
        comparison("preserve", "keep", points=-2.0, ret=0.75),
        comparison("preserve", "lost", points=-40.0, ret=0.25, regressed=True),
        comparison("preserve", "kl", unit="nats", points=None, ret=None),
    ]
    return Report("recipes/r.yaml", "base/m", "runs/r/final", "adapter", "fp12", tasks, fail_on_regression,
                  created="2026-01-02T03:04:05+0000")  # fmt: skip


def test_report_summary_by_hand():
    report = make_report()
    assert report.new_task_gain == 30.0 and report.mean_retention == 0.5  # (0.75 + 0.25) / 2
    assert [t.name for t in report.regressions] == ["lost"] and report.passed is False
    data = report.to_dict()
    assert data["summary"] == {"new_task_gain_points": 30.0, "mean_retention": 0.5, "regressions": ["lost"],
                               "passed": False}  # fmt: skip
    assert data["recipe"] == "recipes/r.yaml" and data["created"] == "2026-01-02T03:04:05+0000"
    assert [t["name"] for t in data["tasks"]] == ["new", "new2", "keep", "lost", "kl"]
    empty = Report("r", "b", "c", "full", "f", [], None)
    assert (empty.new_task_gain, empty.mean_retention, empty.regressions, empty.passed) == (None, None, [], True)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def test_format_score_per_unit():
    assert format_score(0.125, "fraction") == "12.5%"
    assert format_score(1.0, "fraction") == "100.0%"
    assert format_score(0.25, "nats") == "0.2500"
    assert format_score(3.14159, "ratio") == "3.142"
    assert format_score(None, "fraction") == "-" and format_score(math.nan, "ratio") == "-"
    assert format_score(2, "ratio") == "2.000"  # an int is no NaN


def test_format_points_and_stderr():
    assert format_points(comparison(points=12.34)) == "+12.3 pts"
    assert format_points(comparison(points=-5.0, unit="ratio")) == "-5.0%"
    assert format_points(comparison(points=None, delta=0.05)) == "+0.0500"
    assert format_stderr(comparison(se_points=1.26)) == "±1.3"
    assert format_stderr(comparison(se_points=None, se_delta=0.01)) == "±0.0100"
    assert format_stderr(comparison(se_points=None, se_delta=None)) == "-"
    assert _status(comparison(regressed=True)) == "REGRESSED" and _status(comparison()) == "ok"


def test_rows_wide_and_narrow():
    t = comparison(cached=True)
    assert _row(t) == ["preserve", "t", "em", "62.5% (cached)", "50.0%", "-12.5 pts", "±2.5", "0.800", "ok"]
    assert _narrow_row(t) == ["preserve", "t", "62.5%*", "50.0%", "-12.5 ±2.5", "0.800", "ok"]
    bare = comparison(points=None, se_points=None, se_delta=None, ret=None, regressed=True, delta=-0.125)
    assert _row(bare) == ["preserve", "t", "em", "62.5%", "50.0%", "-0.1250", "-", "-", "REGRESSED"]
    assert _narrow_row(bare) == ["preserve", "t", "62.5%", "50.0%", "-0.1250", "-", "REGRESSED"]
    ratio = comparison(unit="ratio", points=-20.0, se_points=None, se_delta=None, base=10.0, tuned=12.0)
    assert _narrow_row(ratio)[2:5] == ["10.000", "12.000", "-20.0%"]


def test_summary_lines_by_hand():
    assert summary_lines(make_report()) == [
        "new-task gain: +30.0 points (mean over target tasks)",
        "mean retention: 0.500 (over preserve tasks)",
        "regression gate (5 points): FAILED: lost",
    ]
    empty = Report("r", "b", "c", "full", "f", [comparison("preserve", ret=None)], None)
    assert summary_lines(empty) == ["new-task gain: -", "mean retention: -"]
    ok = Report("r", "b", "c", "full", "f", [comparison("preserve", "a", ret=1.0)], 2.5)
    assert summary_lines(ok)[-1] == "regression gate (2.5 points): passed"
    two = Report("r", "b", "c", "full", "f", [comparison(name="a", regressed=True), comparison(name="b", regressed=True)], 0.0)
    assert summary_lines(two)[-1] == "regression gate (0 points): FAILED: a, b"


def cells(table) -> list[list[str]]:
    return [[str(col._cells[i]) for col in table.columns] for i in range(table.row_count)]


def test_render_table_narrow_and_wide():
    report = make_report()
    report.tasks[2].base_cached = True
    narrow = render_table(report, 80)
    assert narrow.title == "ppft eval: r.yaml"
    assert [c.header for c in narrow.columns] == NARROW_HEADERS
    assert [c.justify for c in narrow.columns] == ["left"] * 2 + ["right"] * 5
    assert narrow.caption == "\n".join([*summary_lines(report), "* base score from the cache"])
    assert cells(narrow) == [_narrow_row(t) for t in report.tasks]
    assert [r.style for r in narrow.rows] == [None, None, None, "red", None]
    assert narrow.box is box.SIMPLE_HEAD
    wide = render_table(report, 160)
    assert wide.title == "ppft eval: recipes/r.yaml"
    assert [c.header for c in wide.columns] == HEADERS
    assert [c.justify for c in wide.columns] == ["left"] * 3 + ["right"] * 6
    assert wide.caption == "\n".join(summary_lines(report))  # the wide table says "(cached)" in the cell
    assert cells(wide) == [_row(t) for t in report.tasks] and wide.box is box.HEAVY_HEAD
    assert render_table(make_report(), 80).caption == "\n".join(summary_lines(make_report()))  # nothing cached
    assert render_table(make_report(), None).title == "ppft eval: r.yaml"  # no width: narrow


def test_render_markdown_by_hand():
    report = Report("r.yaml", "base/m", "runs/final", "adapter", "fp12",
                    [comparison("preserve", "a|b", cached=True)], None, created="2026-01-02")  # fmt: skip
    assert render_markdown(report) == (
        "# ppft eval: r.yaml\n"
        "\n"
        "- base model: `base/m` (fingerprint `fp12`)\n"
        "- tuned: `runs/final` (adapter)\n"
        "- created: 2026-01-02\n"
        "\n"
        "| suite | task | metric | base | tuned | change | ± se | retention | status |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| preserve | a\\|b | em | 62.5% (cached) | 50.0% | -12.5 pts | ±2.5 | 0.800 | ok |\n"
        "\n"
        "- new-task gain: -\n"
        "- mean retention: 0.800 (over preserve tasks)\n"
    )


def test_write_report_writes_both_files(tmp_path):
    report = make_report()
    out = tmp_path / "a" / "eval"
    json_path, md_path = write_report(report, out)
    assert (json_path, md_path) == (out / "report.json", out / "report.md")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report.to_dict()))
    assert json_path.read_text().startswith('{\n  "recipe": "recipes/r.yaml"')  # indented
    assert md_path.read_text() == render_markdown(report)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no temporary files left
    report.tasks = report.tasks[:1]
    report.samples = {"new": {"base": [{"prompt": Path("p.txt")}], "tuned": []}}  # a value JSON cannot hold
    assert write_report(report, out) == (json_path, md_path)  # the folder exists now: overwritten
    data = json.loads(json_path.read_text())
    assert [t["name"] for t in data["tasks"]] == ["new"] and data["samples"]["new"]["base"] == [{"prompt": "p.txt"}]
