"""Checkpoint files, names, rotation and the round trip of every piece of state, on a one-layer model.

The method is a stand-in holding exactly the tensors a method hands ``save_checkpoint``
(``trainable_state``, ``state_dict``), so each file's content is known by construction.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from preserve_core import checkpoint as ckpt
from preserve_core.checkpoint import TrainState, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from preserve_core.checkpoint_integrity import read_checksums
from preserve_core.errors import PPFTError


class StandIn:
    """A method whose trainable state is the model's weight and whose own state is ``extra``."""

    def __init__(self, extra: dict | None = None):
        self.extra = extra or {}
        self.loaded_trainable, self.loaded_state = None, None

    def trainable_state(self, model):
        return {"weight": model.weight.T}  # a non-contiguous view: the file must hold it contiguous

    def load_trainable_state(self, model, state):
        self.loaded_trainable = state
        model.weight.data.copy_(state["weight"].T)

    def state_dict(self):
        return self.extra

    def load_state_dict(self, state):
        self.loaded_state = state


class Regs:
    def __init__(self, state: dict):
        self.state, self.loaded = state, None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_files_names_and_contents(tmp_path):
    model, optimizer, scheduler = _training()
    watch = {"first": [2.5], "ema": None, "best": None, "steps": 1, "fired": False}
    state = TrainState(step=7, epoch=2, position=3, tokens=41, recipe={"a": 1}, loss_watch=watch)
    path = save_checkpoint(tmp_path, state, StandIn(), model, optimizer, scheduler, keep_last=2)
    assert path == tmp_path / "checkpoint-000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000007"]  # the temporary folder is gone
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "state.pt", "trainable.safetensors", "trainer_state.json"]
    assert sorted(read_checksums(path)) == ["state.pt", "trainable.safetensors", "trainer_state.json"]
    assert torch.equal(load_file(path / "trainable.safetensors")["weight"], model.weight.detach().T)
    summary = {"step": 7, "epoch": 2, "position": 3, "tokens": 41, "recipe": {"a": 1}, "loss_watch": watch}
    assert (path / "trainer_state.json").read_text() == json.dumps(summary, indent=2)
    blob = torch.load(path / "state.pt", weights_only=True)
    assert sorted(blob) == ["optimizer", "rng", "scheduler", "train"] and blob["train"] == summary
    assert blob["scheduler"]["last_epoch"] == 1 and blob["optimizer"]["state"][0]["step"] == 1
    assert set(blob["rng"]) == {"python", "torch"} | ({"cuda"} if torch.cuda.is_available() else set())


def test_method_and_regularizer_files_only_when_they_hold_state(tmp_path):
    model, optimizer, scheduler = _training()
    extra, regs = {"basis": torch.arange(4.0)}, Regs({"ewc/fisher": torch.ones(2)})
    tmp_path = tmp_path / "not" / "yet"  # the run folder's parents are made as needed
    path = save_checkpoint(tmp_path, TrainState(step=1), StandIn(extra), model, optimizer, scheduler, 1, regs)
    assert torch.equal(load_file(path / "method.safetensors")["basis"], torch.arange(4.0))
    assert torch.equal(load_file(path / "regularizers.safetensors")["ewc/fisher"], torch.ones(2))
    path = save_checkpoint(tmp_path, TrainState(step=2), StandIn(), model, optimizer, scheduler, 1, Regs({}))
    assert not (path / "method.safetensors").exists() and not (path / "regularizers.safetensors").exists()


def test_a_given_optimizer_state_is_written_instead(tmp_path):
    model, optimizer, scheduler = _training()
    gathered = {"state": {}, "param_groups": [{"lr": 0.5, "params": [0]}]}
    path = save_checkpoint(tmp_path, TrainState(step=3), StandIn(), model, optimizer, scheduler, 2, None, gathered)
    assert torch.load(path / "state.pt", weights_only=True)["optimizer"] == gathered


def test_stale_folders_of_the_same_step_are_replaced(tmp_path):
    model, optimizer, scheduler = _training()
    for stale in ("checkpoint-000005", ".tmp-checkpoint-000005"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk").write_text("x")
    path = save_checkpoint(tmp_path, TrainState(step=5), StandIn(), model, optimizer, scheduler, 2)
    assert not (path / "junk").exists() and not (tmp_path / ".tmp-checkpoint-000005").exists()


def test_keep_last_rotates_the_oldest_out(tmp_path):
    model, optimizer, scheduler = _training()
    (tmp_path / "checkpoint-000000").mkdir()  # no state.pt: not a checkpoint, never listed or rotated
    kept = []
    for step in (1, 2, 3, 12):
        save_checkpoint(tmp_path, TrainState(step=step), StandIn(), model, optimizer, scheduler, keep_last=2)
        kept.append([p.name for p in list_checkpoints(tmp_path)])
    assert kept == [
        ["checkpoint-000001"],
        ["checkpoint-000001", "checkpoint-000002"],
        ["checkpoint-000002", "checkpoint-000003"],
        ["checkpoint-000003", "checkpoint-000012"],
    ]
    assert (tmp_path / "checkpoint-000000").is_dir()
    save_checkpoint(tmp_path, TrainState(step=13), StandIn(), model, optimizer, scheduler, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000013"]


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = _training()
    extra, regs = {"basis": torch.arange(4.0)}, Regs({"ewc/fisher": torch.ones(2)})
    state = TrainState(step=4, epoch=1, position=2, tokens=99, recipe={"b": [1, 2]})
    random.seed(11)
    torch.manual_seed(12)
    path = save_checkpoint(tmp_path, state, StandIn(extra), model, optimizer, scheduler, 2, regs)
    after_save = (random.random(), torch.rand(3))
    saved_weight = model.weight.detach().clone()
    model.weight.data.zero_()
    _, fresh_optimizer, fresh_scheduler = _training(seed=1)
    fresh_optimizer.state.clear()
    method, fresh_regs = StandIn(), Regs({})
    random.seed(0)
    torch.manual_seed(0)
    loaded = load_checkpoint(path, method, model, fresh_optimizer, fresh_scheduler, fresh_regs)
    assert loaded == state
    assert (random.random(), *torch.rand(3).tolist()) == (after_save[0], *after_save[1].tolist())
    assert torch.equal(model.weight.detach(), saved_weight) and torch.equal(method.loaded_trainable["weight"], saved_weight.T)
    assert torch.equal(method.loaded_state["basis"], torch.arange(4.0))
    assert torch.equal(fresh_regs.loaded["ewc/fisher"], torch.ones(2))
    assert fresh_scheduler.last_epoch == 1
    saved, restored = optimizer.state_dict()["state"][0], fresh_optimizer.state_dict()["state"][0]
    assert all(torch.equal(torch.as_tensor(saved[k]), torch.as_tensor(restored[k])) for k in saved)


def test_loading_without_optional_files_or_regularizers(tmp_path):
    model, optimizer, scheduler = _training()
    path = save_checkpoint(tmp_path, TrainState(step=1), StandIn(), model, optimizer, scheduler, 2)
    method = StandIn()
    assert load_checkpoint(path, method, model, optimizer, scheduler, Regs({})).step == 1
    assert method.loaded_state is None  # no method.safetensors: nothing loaded
    with_regs = save_checkpoint(tmp_path, TrainState(step=2), StandIn(), model, optimizer, scheduler, 2, Regs({"r": torch.ones(1)}))
    assert load_checkpoint(with_regs, StandIn(), model, optimizer, scheduler, None).step == 2  # regularizers: None


def test_unreadable_files_name_the_file_and_the_error(tmp_path):
    model, optimizer, scheduler = _training()
    path = save_checkpoint(tmp_path, TrainState(step=1), StandIn(), model, optimizer, scheduler, 2)
    (path / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PPFTError) as err:
        load_checkpoint(path, StandIn(), model, optimizer, scheduler)
    assert str(err.value).startswith(f"{path / 'trainable.safetensors'}: cannot read checkpoint tensors (SafetensorError: ")
    with pytest.raises(PPFTError) as err:
        ckpt._read_state(path / "missing.pt")
    assert str(err.value).startswith(f"{path / 'missing.pt'}: cannot read checkpoint state (FileNotFoundError: ")


def test_state_is_loaded_weights_only(tmp_path):
    """A pickled object that is not plain tensors/containers is refused, not executed."""
    torch.save({"train": argparse.Namespace(step=1)}, tmp_path / "state.pt")
    with pytest.raises(PPFTError, match="cannot read checkpoint state"):
        ckpt._read_state(tmp_path / "state.pt")


def test_cuda_rng_state_is_saved_and_restored_when_present(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda-rng"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = rng_state()
    assert sorted(state) == ["cuda", "python", "torch"] and state["cuda"] == ["cuda-rng"]
    set_rng_state(state)
    assert restored == [["cuda-rng"]]
    set_rng_state({k: state[k] for k in ("python", "torch")})  # written on a CPU machine
    assert restored == [["cuda-rng"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state)  # written on a GPU, resumed on CPU: the CUDA part is skipped
    assert restored == [["cuda-rng"]] and sorted(rng_state()) == ["python", "torch"]


def test_an_old_checkpoint_that_cannot_be_removed_does_not_fail_the_save(tmp_path):
    """Rotation is best effort: ``rmtree`` refuses a symlinked folder, and the new checkpoint still stands."""
    model, optimizer, scheduler = _training()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "state.pt").write_bytes(b"")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint-000001").symlink_to(elsewhere, target_is_directory=True)
    path = save_checkpoint(run_dir, TrainState(step=2), StandIn(), model, optimizer, scheduler, keep_last=1)
    assert path.name == "checkpoint-000002" and (path / "SHA256SUMS").exists()
    assert (elsewhere / "state.pt").exists()  # nothing outside the run folder was deleted
