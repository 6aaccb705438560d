"""Atomic, resumable checkpoints.

A checkpoint folder ``checkpoint-<step>`` holds:
- ``trainable.safetensors``: the tensors training changes (``method.trainable_state``),
- ``method.safetensors``: method-owned tensors (``method.state_dict()``), if any,
- ``regularizers.safetensors``: the state of the method's regularisers (``<name>/<key>``), if any,
- ``state.pt``: optimizer, scheduler, RNG states and the data position (loaded with ``weights_only=True``),
- ``trainer_state.json``: a human-readable summary,
- ``SHA256SUMS``: the digest of every other file (``checkpoint_integrity``), checked by ``--resume``.

It is written to ``.tmp-checkpoint-<step>`` and renamed into place, so a crash never leaves a
half-written checkpoint where ``--resume`` would find it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint_integrity import write_checksums
from .errors import PPFTError


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer updates. ``position`` counts batches into ``epoch``."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    tokens: int = 0
    recipe: dict | None = None  # the resolved recipe the run was made with (``--resume`` compares it)
    loss_watch: dict | None = None  # ``guards.LossWatch.state()``: a resumed run warns as an uninterrupted one


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(
    run_dir: Path, state: TrainState, method, model, optimizer, scheduler, keep_last: int, regularizers=None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; ``optimizer_state`` (default ``optimizer.state_dict()``): gathered under FSDP."""
    final = run_dir / f"checkpoint-{state.step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(method.trainable_state(model)), tmp / "trainable.safetensors")
    method_state = method.state_dict()
    if method_state:
        save_file(_contiguous(method_state), tmp / "method.safetensors")
    regularizer_state = regularizers.state_dict() if regularizers is not None else {}
    if regularizer_state:
        save_file(_contiguous(regularizer_state), tmp / "regularizers.safetensors")
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "train": asdict(state),
        },  # fmt: skip
        tmp / "state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    write_checksums(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _rotate(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint-*") if (p / "state.pt").exists())


def _rotate(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _read(path: Path, what: str, load):
    """``load(path)``; any failure becomes a PPFTError naming the file (SafetensorError and torch's
    unpickling errors say what is wrong but not where)."""
    try:
        return load(path)
    except Exception as e:
        raise PPFTError(f"{path}: cannot read checkpoint {what} ({type(e).__name__}: {e})") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, "tensors", load_file)


def _read_state(path: Path) -> dict:
    return _read(path, "state", lambda p: torch.load(p, weights_only=True))


def load_checkpoint(path: Path, method, model, optimizer, scheduler, regularizers=None) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the saved :class:`TrainState`.

    The files hold full tensors; under FSDP each is split like the parameter it belongs to.
    """
    from .sharding import shard_optimizer_state, shard_state_like

    method.load_trainable_state(model, shard_state_like(_read_tensors(path / "trainable.safetensors"), model))
    if (path / "method.safetensors").exists():
        method.load_state_dict(_read_tensors(path / "method.safetensors"))
    if regularizers is not None and (path / "regularizers.safetensors").exists():
        regularizers.load_state_dict(_read_tensors(path / "regularizers.safetensors"))
    blob = _read_state(path / "state.pt")
    optimizer.load_state_dict(blob["optimizer"])
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["train"])
