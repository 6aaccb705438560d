"""Stops under several processes (DDP/FSDP): a signal only records a request; every rank stops after the
same step. Unit tests of the guard in this process, and a real SIGTERM to one of two torchrun ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from preserve_core.checkpoint import list_checkpoints
from preserve_core.checkpoint_integrity import checkpoint_problem
from preserve_core.guards import (
    NO_STOP,
    STOP_INTERRUPT,
    STOP_TERMINATE,
    Terminated,
    coordinated_interrupts,
    deferred_interrupts,
    stop_requested,
)
from preserve_core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_a_first_signal_is_recorded_not_raised():
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup / a background job
    with coordinated_interrupts():
        assert stop_requested() == NO_STOP
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_requested() == STOP_INTERRUPT
    assert stop_requested() == NO_STOP  # outside the block nothing is pending
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_recorded_as_terminate_and_a_second_signal_raises_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), coordinated_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested() == STOP_TERMINATE
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second SIGTERM did not raise")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_held_signal_becomes_a_request_after_the_guarded_block():
    """An update or a checkpoint write under coordination: held, then recorded (not raised) if first,
    raised if it is the second."""
    with coordinated_interrupts():
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested() == STOP_TERMINATE
        with pytest.raises(KeyboardInterrupt), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            completed = True  # the block itself still runs to its end
        assert completed


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The worker process of ``rank`` under the torchrun launcher ``launcher`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                if _ppid(int(entry.name)) == launcher and f"RANK={rank}".encode() in environ:
                    return int(entry.name)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return None


def _torchrun(path: Path, *args: str, pythonpath: str = str(REPO)) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cli.main", "train", str(path),
           "--no-progress", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.mark.slow  # three two-process runs: about a minute
def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_resume_is_exact(write_recipe, tmp_path):
    """Before: the signalled rank raised mid-step and waited in the checkpoint's barrier while the other
    waited in the step's gradient all-reduce, until the collective timed out. Now both save one step
    and exit 143, and resuming ends where a straight two-process run does, bit for bit."""
    training = {"max_steps": 40, "log_every": 1, "batch_size": 4}
    calibration = {"dir": str(tmp_path / "calibration")}
    straight = write_recipe("straight", training=training, calibration=calibration)
    assert _torchrun(straight).wait(timeout=300) == 0
    path = write_recipe("preempted", training=training, calibration=calibration)
    run_dir = load_recipe(path).run_dir()
    proc = _torchrun(path)
    deadline = time.monotonic() + 240
    while _logged_steps(run_dir) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)  # the other rank gets nothing
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        pytest.fail("the ranks hung after a SIGTERM to one of them")
    assert proc.returncode != 0, "the run ended before the signal: make its steps longer"
    assert "Terminated (SIGTERM): saved" in err, err[-3000:]
    (checkpoint,) = list_checkpoints(run_dir)
    assert checkpoint_problem(checkpoint) is None
    assert 3 <= int(checkpoint.name.split("-")[1]) < 40
    resumed = _torchrun(path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    a = load_file(load_recipe(straight).run_dir() / "final" / "adapter_model.safetensors")
    b = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


FAIL_SAVE_ON_RANK_0 = '''
import os
if os.environ.get("RANK") == "0":
    import preserve_core.training as training

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device (injected) [/var/ckpt]")

    training.save_checkpoint = failing
'''


@pytest.mark.slow  # one two-process run: about 15 s
def test_an_error_on_rank_0_alone_ends_every_rank_with_its_message(write_recipe, tmp_path):
    """Rank 0 fails in its checkpoint write (injected through ``sitecustomize``) while rank 1 waits in
    the barrier after it: rank 1 must not wait for a collective timeout, and the launcher must exit
    non-zero with rank 0's message (its brackets once crashed the other rank's error printer)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_SAVE_ON_RANK_0)
    path = write_recipe(training={"max_steps": 6, "save_every": 2, "batch_size": 4})
    proc = _torchrun(path, pythonpath=f"{hook}{os.pathsep}{REPO}")
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rank 1 kept waiting after rank 0 failed")
    assert proc.returncode != 0
    assert "No space left on device (injected) [/var/ckpt]" in err
    assert "MarkupError" not in err
    assert not list_checkpoints(load_recipe(path).run_dir())
