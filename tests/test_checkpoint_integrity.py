"""Checkpoint integrity: every checkpoint carries sha256 digests; --resume verifies them, skips a
damaged newest checkpoint saying which and why, falls back to the newest intact one (and the resumed
run still ends exactly where an uninterrupted run does), and exits 2 when none is intact."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import run_recipe

from cli.main import app
from preserve_core.checkpoint import list_checkpoints, load_checkpoint
from preserve_core.errors import PPFTError
from preserve_core.recipe import load_recipe
from preserve_core.training import train

TRAINING = {"max_steps": 4, "save_every": 2, "keep_last": 2, "lr": 1e-2, "warmup_steps": 2}


def test_every_checkpoint_file_has_its_sha256(write_recipe):
    result = run_recipe(write_recipe(training={"max_steps": 2}))
    folder = list_checkpoints(result.run_dir)[-1]
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    files = {p.name for p in folder.iterdir() if p.name != "SHA256SUMS"}
    assert set(listed) == files and {"trainable.safetensors", "state.pt"} <= files
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def _truncate(folder):
    path = folder / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "trainable.safetensors does not match its checksum"


def _garble_tensor_bytes(folder):
    """The header stays valid, so the file loads; only the checksum can tell."""
    path = folder / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(b ^ 0x5A for b in data[-16:])
    path.write_bytes(bytes(data))
    return "trainable.safetensors does not match its checksum"


def _garble_state(folder):
    path = folder / "state.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    return "state.pt does not match its checksum"


def _poisoned_without_checksums(folder):
    """What ppft before checksums could write: NaN weights and no SHA256SUMS."""
    tensors = load_file(folder / "trainable.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, folder / "trainable.safetensors")
    (folder / "SHA256SUMS").unlink()
    return "trainable.safetensors holds non-finite values"


def _final_adapter(run_dir):
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def test_resume_skips_a_damaged_newest_checkpoint_and_stays_exact(write_recipe, capsys):
    straight = _final_adapter(run_recipe(write_recipe("straight", training=TRAINING)).run_dir)
    for damage in (_truncate, _garble_tensor_bytes, _garble_state, _poisoned_without_checksums):
        path = write_recipe(damage.__name__, training=TRAINING)
        run_dir = run_recipe(path).run_dir
        shutil.rmtree(run_dir / "final")
        expected_reason = damage(run_dir / "checkpoint-000004")
        capsys.readouterr()
        run_recipe(path, resume=True)
        warning = " ".join(capsys.readouterr().err.split())
        assert "skipping" in warning and "checkpoint-000004" in warning and expected_reason in warning, warning
        assert "resuming from checkpoint-000002" in warning
        resumed = _final_adapter(run_dir)
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_resume_with_no_intact_checkpoint_exits_2(write_recipe):
    path = write_recipe(training=TRAINING)
    run_dir = run_recipe(path).run_dir
    shutil.rmtree(run_dir / "final")
    _truncate(run_dir / "checkpoint-000004")
    _garble_state(run_dir / "checkpoint-000002")
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "--no-progress"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "no intact checkpoint" in output and "checkpoint-000004" in output and "checkpoint-000002" in output
    assert "overwrite" in output


def test_unreadable_safetensors_error_names_the_file(write_recipe):
    folder = list_checkpoints(run_recipe(write_recipe(training={"max_steps": 2})).run_dir)[-1]
    (folder / "trainable.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(PPFTError, match=r"trainable\.safetensors: cannot read checkpoint tensors \("):
        load_checkpoint(folder, _NoMethod(), None, None, None)


class _NoMethod:
    def load_trainable_state(self, model, state):
        raise AssertionError("a damaged file must not reach the model")


def test_unreadable_state_error_names_the_file(write_recipe):
    folder = list_checkpoints(run_recipe(write_recipe(training={"max_steps": 2})).run_dir)[-1]
    (folder / "state.pt").write_bytes(b"not a zip archive")
    with pytest.raises(PPFTError, match=r"state\.pt: cannot read checkpoint state \(\w+Error: "):
        load_checkpoint(folder, _AcceptingMethod(), torch.nn.Linear(1, 1), None, None)


class _AcceptingMethod:
    def load_trainable_state(self, model, state):
        pass

    def load_state_dict(self, state):
        pass


def test_a_failed_write_leaves_the_previous_checkpoint_resumable(write_recipe, monkeypatch):
    """A checkpoint write that dies half-way (here: the disk fills) never replaces or hides the previous one."""
    from preserve_core import checkpoint as checkpoint_module

    original = checkpoint_module.write_checksums
    calls = {"n": 0}

    def disk_full_on_second(folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(folder)

    monkeypatch.setattr(checkpoint_module, "write_checksums", disk_full_on_second)
    path = write_recipe(training=TRAINING)
    with pytest.raises(OSError):
        run_recipe(path)
    run_dir = load_recipe(path).run_dir()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000002"]
    monkeypatch.setattr(checkpoint_module, "write_checksums", original)
    assert run_recipe(path, resume=True).steps == 4
