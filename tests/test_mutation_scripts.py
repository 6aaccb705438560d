"""The mutation-testing helpers: a seeded sample that nests across sizes, and the Wilson interval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from mutation_sample import sample  # noqa: E402
from mutation_summary import wilson  # noqa: E402


def test_sample_is_seeded_sized_and_without_repeats():
    names = [f"m{i:04d}" for i in range(1000)]
    a = sample(names, 0.05, seed=1)
    assert len(a) == len(set(a)) == 50 and set(a) <= set(names) and a == sorted(a)
    assert sample(names, 0.05, seed=1) == a
    assert sample(names, 0.05, seed=2) != a
    assert sample(names, 0.0001, seed=0) and len(sample(names, 0.0001, seed=0)) == 1


def test_wilson_interval_known_values():
    # 8 of 10 at 95%: the textbook Wilson interval is [0.490, 0.943]; 0 of 10: [0, 0.278].
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.2775, abs=1e-3)
