"""bench/common.py (what the bench scripts share) and the tables bench/summarize.py renders with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    """``(common, summarize)``, imported as the scripts import them (bench/ first on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
        import summarize
    finally:
        sys.path.remove(str(BENCH))
    return common, summarize


def test_interleaved_runs_every_variant_once_per_round_in_order(bench_modules):
    common, _ = bench_modules
    calls, reported = [], []

    def variant(name):
        def run():
            calls.append(name)
            return len(calls)

        return run

    runs = common.interleaved({"x": variant("x"), "y": variant("y")}, 3, report=lambda n, r: reported.append((n, r)))
    assert calls == ["x", "y"] * 3
    assert runs == {"x": [1, 3, 5], "y": [2, 4, 6]}
    assert reported == [("x", 1), ("y", 2), ("x", 3), ("y", 4), ("x", 5), ("y", 6)]


def test_markdown_table_lines(bench_modules):
    common, _ = bench_modules
    assert common.markdown_table(["a", "b c"], [["1", ""], ["", "x"]]) == ["| a | b c |", "|---|---|", "| 1 | |", "| | x |"]
    assert common.markdown_table(["a"], [], "Intro:") == ["Intro:", "", "| a |", "|---|"]


def test_write_result_writes_all_and_prints_what_is_shown(bench_modules, tmp_path, capsys):
    common, _ = bench_modules
    out = tmp_path / "deeper" / "r.json"
    common.write_result(out, {"a": 1, "b": [2.5]}, shown={"a": 1})
    assert out.read_text() == '{\n  "a": 1,\n  "b": [\n    2.5\n  ]\n}\n'
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def test_summarize_sections_render_the_known_tables(bench_modules):
    _, summarize = bench_modules
    train = {"settings": {"hidden": 256, "layers": 4, "batch": 16, "steps": 60, "repeats": 3},
             "ppft_tokens_per_s": 1234.4, "hf_trainer_tokens_per_s": 1000.6, "ratio_ppft_over_hf": 1.2337, "target": ">= 1.0"}  # fmt: skip
    assert summarize.train_section(train) == [
        "ppft `train` (lora) vs Hugging Face `Trainer` + PEFT, hidden 256, 4 layers, batch 16, 60 steps, best of 3 interleaved repeats:",
        "",
        "| ppft tokens/s | HF Trainer tokens/s | ratio | target |",
        "|---|---|---|---|",
        "| 1234 | 1001 | 1.23 | >= 1.0 |",
    ]
    methods = {"settings": {"hidden": 512, "layers": 4, "batch": 16, "steps": 30},
               "methods": {"lora": {"step_seconds_median": 0.01234, "peak_rss_mb": 700.4},
                           "fora": {"step_seconds_median": 0.02, "peak_rss_mb": 800.0, "reference": "lora", "step_time_ratio": 1.62},
                           "bad": {"error": "RuntimeError: boom"}}}  # fmt: skip
    assert summarize.methods_section(methods)[2:] == [
        "| method | step (s) | vs | ratio | peak RSS (MB) |",
        "|---|---|---|---|---|",
        "| lora | 0.012 | - | - | 700 |",
        "| fora | 0.020 | lora | 1.62 | 800 |",
        "| bad | error: RuntimeError: boom | | | |",
    ]
