"""Bench aggregation: seed-to-seed spread beside the pooled binomial error, and the 'tuned on' vs
'held out' split (learning rate picked on tuned-on tasks only), on hand-made cells."""

from __future__ import annotations

import math

import pytest

from preserve_core.bench_report import aggregate, markdown, split_summary


def cell(task: str, label: str, lr: float, seed: int, new: float, kept: tuple[float, float]) -> dict:
    scores = {task: {"score": new, "n": 100, "stderr": None, "metric": "exact_match"}}
    scores.update({name: {"score": k, "n": 100, "stderr": None, "metric": "exact_match"} for name, k in zip(("rev", "srt"), kept)})
    return {"task": task, "label": label, "lr": lr, "seed": seed, "scores": scores, "train_seconds": 1.0}


def test_seed_spread_is_mean_sample_std_and_min_of_per_seed_scores():
    cells = [cell("a", "m", 1e-3, s, new, (k, 1.0)) for s, new, k in ((0, 0.90, 0.80), (1, 0.70, 0.60), (2, 1.00, 0.70))]
    (row,) = aggregate(cells, ["rev", "srt"])
    spread = row["seed_spread"]["new_task"]
    assert spread["mean"] == pytest.approx(0.8666666667) and spread["min"] == 0.70 and spread["per_seed"] == [0.90, 0.70, 1.00]
    # sample std by hand: deviations 0.0333, -0.1667, 0.1333 -> sqrt((0.00111 + 0.02778 + 0.01778) / 2) = 0.15275
    assert spread["std"] == pytest.approx(0.152753, rel=1e-5)
    kept = row["seed_spread"]["preserve_mean"]  # per seed: 0.90, 0.80, 0.85
    assert kept["mean"] == pytest.approx(0.85) and kept["std"] == pytest.approx(0.05) and kept["min"] == pytest.approx(0.80)
    assert row["new_task"]["stderr"] == pytest.approx(math.sqrt(0.8666666667 * 0.1333333333 / 300))  # pooled binomial
    assert row["worst_preserve"] == pytest.approx(0.70)  # rev pooled over seeds


def test_held_out_tasks_do_not_pick_the_learning_rate():
    # lr 1 is best on the tuned task t, lr 2 would be best on the held-out task h: the summary must use lr 1
    cells = [
        cell("t", "m", 1.0, 0, 0.9, (0.9, 0.9)), cell("t", "m", 2.0, 0, 0.5, (0.5, 0.5)),
        cell("h", "m", 1.0, 0, 0.4, (0.8, 0.6)), cell("h", "m", 2.0, 0, 1.0, (1.0, 1.0)),
    ]  # fmt: skip
    rows = aggregate(cells, ["rev", "srt"])
    (entry,) = split_summary(rows, ["h"])
    assert entry["lr"] == 1.0 and entry["lr_picked_on"] == "tuned"
    assert entry["tuned"]["new_mean"] == pytest.approx(0.9) and entry["tuned"]["tasks"] == ["t"]
    held = entry["held_out"]
    assert (held["new_mean"], held["preserve_mean"], held["worst_skill"]) == (pytest.approx(0.4), pytest.approx(0.7), pytest.approx(0.6))
    text = markdown(rows, {}, ["rev", "srt"], {"held_out": ["h"]})
    assert "Held-out tasks (not used to pick a method's learning rate): h" in text
    assert "| m | 1 | 90.0 (90.0) | 90.0 (90.0) | 40.0 (40.0) | 70.0 (70.0) | 60.0 |" in text
    (nothing_held,) = split_summary(rows, [])
    assert nothing_held["held_out"] is None and nothing_held["tuned"]["tasks"] == ["h", "t"]


def test_pareto_plot_wraps_tasks_into_rows_of_four(tmp_path):
    """Five tasks: two rows of four panels, so the PNG is 4 x 6.5 in wide and 2 x 5.2 in tall at 110 dpi
    (2860 x 1144 pixels, read from the PNG header), not 5 panels in one 35.75 in row."""
    import struct

    from preserve_core.bench_report import pareto_plot

    rows = [{"task": f"t{i}", "method": m, "preserve_mean": {"score": 0.5 + 0.1 * j}, "new_task": {"score": 0.9 - 0.1 * j},
             "pareto": True} for i in range(5) for j, m in enumerate(("a", "b"))]  # fmt: skip
    path = tmp_path / "pareto.png"
    pareto_plot(rows, {"t0": {"score": 0.0}}, path, held_out=["t4"])
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (2860, 1144)
