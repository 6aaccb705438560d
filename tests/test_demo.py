"""The main job end to end: `make demo`'s script on the real lab (slow: 6-10 minutes idle with the lab build, CI only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_calibrates_trains_evaluates_and_compares():
    ppft = Path(sys.executable).parent / "ppft"
    proc = subprocess.run(["bash", "scripts/demo.sh", str(ppft)], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = REPO / "runs" / "demo"
    rows = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    # compare labels a run by its method, by its folder where runs share a method (FORA's, FoLoRA's)
    assert set(rows) == {"full", "kl", "fora_paper", "folora_paper", "fora_kl", "fora_leak", "folora_kl"}
    learned = {m: rows[m]["new_task"]["score"] for m in ("full", "kl", "fora_kl", "fora_leak", "folora_kl")}  # the papers' settings may not
    assert all(score >= 0.8 for score in learned.values()), learned
    # protection is real: the protected runs keep more of the old skills than plain full fine-tuning,
    # and the winning composition keeps most of them (ablations.md: ~95% at 200 steps)
    assert rows["fora_kl"]["preserve_mean"]["score"] > rows["full"]["preserve_mean"]["score"] + 0.5
    assert rows["fora_kl"]["preserve_mean"]["score"] >= 0.85
    assert rows["fora_leak"]["preserve_mean"]["score"] >= 0.85  # the adapter pick (ablations.md 12: ~97%)
    assert rows["folora_kl"]["preserve_mean"]["score"] >= 0.85  # FoLoRA + kl (ablations.md 14c: ~99%)
    assert rows["kl"]["preserve_mean"]["score"] > rows["full"]["preserve_mean"]["score"] + 0.2
    assert (out / "learning_vs_forgetting.png").stat().st_size > 1000
    for folder in ("full", "kl", "fora_paper", "folora_paper", "fora_kl", "fora_leak", "folora_kl"):
        assert (out / folder / "eval" / "report.md").exists()
