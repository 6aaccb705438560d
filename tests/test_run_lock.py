"""Run-folder lock: a second ``ppft train`` on a folder in use fails fast (exit 2) naming the holder;
a lock left by a killed process does not block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from preserve_core.errors import RecipeError
from preserve_core.recipe import load_recipe
from preserve_core.runlock import run_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys; from pathlib import Path; from preserve_core.runlock import run_lock\n" \
    "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()\n"  # fmt: skip


def _holder(run_dir: Path) -> subprocess.Popen:
    """A separate process holding the lock until killed (or its stdin closes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_train_on_a_locked_run_exits_2_naming_the_holder(write_recipe):
    path = write_recipe(training={"max_steps": 2})
    run_dir = load_recipe(path).run_dir()
    child = _holder(run_dir)
    try:
        result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
        assert result.exit_code == 2, result.output
        assert f"pid {child.pid}" in result.output and "in use" in result.output
        assert not (run_dir / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        child.kill()
        child.wait()


def test_lock_of_a_killed_process_does_not_block(write_recipe):
    path = write_recipe(training={"max_steps": 2})
    run_dir = load_recipe(path).run_dir()
    child = _holder(run_dir)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (run_dir / ".lock").read_text().strip() == str(child.pid)  # the stale file is still there
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "final").is_dir()


def test_lock_is_exclusive_within_one_process_and_released_after(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RecipeError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released on exit of the first block
        pass
