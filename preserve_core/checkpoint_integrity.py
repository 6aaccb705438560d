"""Checkpoint integrity: a sha256 manifest written with every checkpoint, verified before a resume.

``SHA256SUMS`` in each checkpoint folder lists the digest of every other file in the format of
``sha256sum`` (so ``cd checkpoint-000100 && sha256sum -c SHA256SUMS`` checks it by hand). A
checkpoint is *intact* when every listed file is present with its digest, every tensor file reads,
and every stored tensor (weights, method state, optimizer moments) is finite.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .guards import all_finite

CHECKSUMS = "SHA256SUMS"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(folder: Path) -> None:
    """Flush every file of ``folder`` to disk and record its sha256 in ``folder/SHA256SUMS``."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    lines = []
    for path in files:
        _fsync(path)
        lines.append(f"{_digest(path)}  {path.name}\n")
    (folder / CHECKSUMS).write_text("".join(lines))
    _fsync(folder / CHECKSUMS)


def read_checksums(folder: Path) -> dict[str, str] | None:
    """``{file name: sha256}`` from ``SHA256SUMS``, or None for a checkpoint written without one."""
    path = folder / CHECKSUMS
    if not path.exists():
        return None
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    return sums


def checksum_problem(folder: Path) -> str | None:
    """The first file of ``folder`` that is missing or differs from its recorded digest, said in words."""
    sums = read_checksums(folder)
    for name, digest in (sums or {}).items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _digest(folder / name) != digest:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def tensor_problem(folder: Path) -> str | None:
    """A tensor file of ``folder`` that cannot be read or holds a non-finite value, said in words.

    Tensors are read one at a time (safetensors) or memory-mapped (``state.pt``), so checking a large
    checkpoint does not hold it in memory twice.
    """
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                finite = all(all_finite([f.get_tensor(key)]) for key in f.keys())
        except Exception as e:  # safetensors raises its own error type for a damaged header or body
            return f"{path.name} cannot be read ({type(e).__name__}: {e})"
        if not finite:
            return f"{path.name} holds non-finite values"
    try:
        blob = torch.load(folder / "state.pt", weights_only=True, mmap=True)
        moments = [v for per_param in blob["optimizer"]["state"].values() for v in per_param.values()]
    except Exception as e:
        return f"state.pt cannot be read ({type(e).__name__}: {e})"
    if not all_finite(moments):
        return "state.pt holds non-finite optimizer state"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is intact."""
    return checksum_problem(folder) or tensor_problem(folder)


def newest_intact(checkpoints: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of ``checkpoints`` (oldest first), and the newer ones skipped with why."""
    skipped = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped
