"""The run directory: guarding it, the manifest, the metrics log, atomic writes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from .checkpoint import list_checkpoints
from .errors import RecipeError

TRACKED_PACKAGES = ("ppft", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber earlier work unless asked: a finished run needs overwrite, checkpoints need --resume."""
    finished = (run_dir / "final").exists()
    checkpoints = list_checkpoints(run_dir) if run_dir.exists() else []
    if resume and not checkpoints:
        raise RecipeError(f"--resume: no checkpoint in {run_dir}. Start without --resume, or point --output-dir at the run.")
    if not resume and (finished or checkpoints) and not overwrite:
        what = "a finished run" if finished else f"{len(checkpoints)} checkpoint(s)"
        raise RecipeError(
            f"{run_dir} already holds {what}. Use --resume to continue, --output-dir to write elsewhere, "
            "or --set output.overwrite=true to replace it."
        )
    if overwrite and not resume:
        for old in checkpoints:
            shutil.rmtree(old)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(run_dir: Path, recipe, extra: dict) -> None:
    """``recipe.resolved.yaml`` (the recipe as run) and ``manifest.json`` (how to reproduce it)."""
    write_atomic(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "seed": recipe.training.seed,
        **extra,
    }
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only), optionally mirrored to TensorBoard.

    A fresh run starts a new log; a resumed one (``resume_step``) keeps only what was logged up to the
    checkpoint, so every step appears once whatever happened to earlier attempts.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        else:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError("training.tensorboard: install tensorboard (pip install tensorboard)") from None
            purge = None if resume_step is None else resume_step + 1  # drops events logged after the checkpoint
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines logged up to ``step``; a line cut short by a crash is dropped too."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, AttributeError):
                continue
        write_atomic(self.path, "".join(kept))

    def close(self) -> None:
        if self.writer:
            self.writer.close()
