"""``training.distributed.timeout_s`` reaches the process group: two gloo ranks under torchrun, rank 1 late."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys, time
from preserve_core.errors import hint_for
from preserve_core.recipe import load_recipe
from preserve_core.training import make_accelerator
accelerator = make_accelerator(load_recipe(sys.argv[1]))
if accelerator.process_index == 1:
    time.sleep(6)  # late to the barrier
try:
    accelerator.wait_for_everyone()
    print(f"rank {accelerator.process_index}: BARRIER PASSED", flush=True)
except RuntimeError as error:
    print(f"rank {accelerator.process_index}: BARRIER FAILED", error, flush=True)
    print("HINTED" if "training.distributed.timeout_s" in (hint_for(error) or "") else "NO HINT", flush=True)
"""


def _barrier(tmp_path: Path, distributed: dict) -> str:
    recipe = tmp_path / f"recipe-{distributed.get('timeout_s', 'default')}.yaml"
    base = REPO / "recipes" / "lab_base.yaml"
    recipe.write_text(yaml.safe_dump({"extends": str(base), "training": {"distributed": distributed}}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), str(recipe)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    return done.stdout


@pytest.mark.slow  # two two-process launches, about 30 s
def test_timeout_s_bounds_a_barrier_and_its_absence_keeps_torchs_default(tmp_path):
    """Rank 1 reaches the barrier 6 s late: with timeout_s 2 rank 0's barrier fails, gloo names the 2,000 ms and
    the CLI's hint recognises gloo's own message; with the default (30 minutes) it waits and passes."""
    late = _barrier(tmp_path, {"timeout_s": 2})
    assert "rank 0: BARRIER FAILED" in late and "Timed out waiting 2000ms" in late
    assert "HINTED" in late and "NO HINT" not in late
    assert "rank 0: BARRIER PASSED" in _barrier(tmp_path, {})
