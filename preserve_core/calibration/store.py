"""The calibration folder on disk and the :class:`Calibration` view of it.

Layout of ``recipe.calibration_dir()``::

    manifest.json               identity (model fingerprint, settings and data hashes), counts,
                                module -> input key map, input widths, extras present
    preserve.jsonl              preserve texts, one {"text": ...} per line (sampled ones also carry
                                "ids": the exact tokens drawn, which the statistics use)
    preserve.json               how they were made (settings, model fingerprint, filter report)
    preserve_stats.safetensors  C_p per input key: its upper triangle, float32 [n (n + 1) / 2]
    task_stats.safetensors      C_t likewise
                                (each only when a method reads it: manifest "stats" lists them)
    extras/<method>.safetensors what Method.calibrate_extra returned
    summary.json                effective ranks (written on first ``ppft calibrate`` summary)

A folder is written whole into a temporary sibling and renamed into place, so a failure never
leaves a half-written calibration behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PPFTError, RecipeError
from .gram import unpack_symmetric, upper_mask

FORMAT = "ppft-calibration"
VERSION = 2  # 2: statistics stored as packed upper triangles, only those a method reads
MANIFEST = "manifest.json"
PRESERVE_TEXTS = "preserve.jsonl"
PRESERVE_SIDECAR = "preserve.json"
STATS_FILES = {"preserve": "preserve_stats.safetensors", "task": "task_stats.safetensors"}
EXTRAS = "extras"


class Calibration:
    """Read access to one calibration folder. Matrices are read from disk on demand."""

    def __init__(self, dir: Path, manifest: dict):
        self.dir = Path(dir)
        self.manifest = manifest
        self.reused = False  # set by ensure_calibration when existing output was reused
        self._texts: list[str] | None = None

    @property
    def preserve_texts(self) -> list[str]:
        if self._texts is None:
            lines = (self.dir / PRESERVE_TEXTS).read_text().splitlines()
            self._texts = [json.loads(line)["text"] for line in lines if line.strip()]
        return self._texts

    def stats(self) -> list[str]:
        """Which statistics the folder holds: ``preserve`` (C_p) and/or ``task`` (C_t)."""
        return list(self.manifest.get("stats", []))

    def preserve_sequences(self, tokenizer, max_length: int) -> list[list[int]]:
        """The preserve token sequences the statistics use: the sampled ids, or ``[bos] + text``."""
        from .batches import encode_preserve_text

        lines = [json.loads(line) for line in (self.dir / PRESERVE_TEXTS).read_text().splitlines() if line.strip()]
        return [row["ids"] if "ids" in row else encode_preserve_text(tokenizer, row["text"], max_length) for row in lines]

    def keys(self) -> list[str]:
        """Distinct input keys, in target-layer order."""
        return list(self.manifest["keys"])

    def input_key(self, module_name: str) -> str:
        """The key of the input ``module_name`` reads; layers sharing an input share a key."""
        try:
            return self.manifest["module_to_key"][module_name]
        except KeyError:
            known = list(self.manifest["module_to_key"])[:4]
            raise PPFTError(
                f"calibration in {self.dir} has no statistics for {module_name!r} (it has e.g. {known}). "
                "Module names are those of the unwrapped base model; rerun `ppft calibrate` if the targets changed."
            ) from None

    def preserve_cov(self, module_name: str) -> torch.Tensor:
        """``C_p = (1/N_p) sum x x^T`` over the preserve tokens, float32 [n, n] (CPU)."""
        return self._matrix("preserve", self.input_key(module_name))

    def task_cov(self, module_name: str) -> torch.Tensor:
        """``C_t`` over the task tokens (loss positions unless ``task_positions`` is ``all`` or ``balanced``),
        float32 [n, n]."""
        return self._matrix("task", self.input_key(module_name))

    def cov_by_key(self, which: str, key: str) -> torch.Tensor:
        return self._matrix(which, key)

    def upper_triangle(self, which: str, key: str, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
        """``C`` as [n, n] ``dtype`` on ``device`` with only its upper triangle (diagonal included) filled,
        the rest 0: what ``torch.linalg.eigh(..., UPLO="U")`` reads; one [n, n] matrix, no symmetric copy."""
        packed = self._packed(which, key)
        n = int(self.manifest["keys"][key]["dim"])
        out = torch.zeros(n, n, dtype=dtype, device=device)
        return out.masked_scatter_(upper_mask(n, device), packed.to(device=device, dtype=dtype))

    def token_counts(self) -> dict[str, int]:
        """``{"preserve": N_p, "task": N_t}``: tokens each statistic averages over."""
        return dict(self.manifest["counts"]["tokens"])

    def extra(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors ``Method.calibrate_extra`` returned for method ``key``."""
        if key not in self.manifest.get("extras", []):
            raise PPFTError(f"calibration in {self.dir} has no extras for method {key!r}; rerun `ppft calibrate` with it")
        path = self.dir / EXTRAS / f"{key}.safetensors"
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}

    def _matrix(self, which: str, key: str) -> torch.Tensor:
        """The full symmetric [n, n] float32 matrix, unpacked from its stored upper triangle."""
        return unpack_symmetric(self._packed(which, key), int(self.manifest["keys"][key]["dim"]))

    def _packed(self, which: str, key: str) -> torch.Tensor:
        if which not in self.stats():
            symbol = {"preserve": "C_p", "task": "C_t"}[which]
            raise PPFTError(
                f"calibration in {self.dir} has no {which} statistics ({symbol}): it was made for a method that "
                "does not read them. `ppft train` adds them on reuse; or run `ppft calibrate <recipe>` for this method."
            )
        with safe_open(str(self.dir / STATS_FILES[which]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def read_manifest(directory: Path) -> dict | None:
    """The folder's manifest, or None when there is no (readable, ppft) calibration there."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def write_texts(directory: Path, texts: list[str], ids: list[list[int]] | None, sidecar: dict) -> None:
    rows = [{"text": t} for t in texts] if ids is None else [{"text": t, "ids": i} for t, i in zip(texts, ids, strict=True)]
    (directory / PRESERVE_TEXTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / PRESERVE_SIDECAR).write_text(json.dumps(sidecar, indent=2))


def write_json(path: Path, data: dict) -> None:
    """Write ``path`` whole or not at all (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def replace_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp)`` on a fresh sibling folder, then swap it in for ``target``.

    A non-empty ``target`` that is not a calibration folder is refused, never deleted.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and read_manifest(target) is None:
        raise RecipeError(f"{target} exists and is not a ppft calibration folder; set calibration.dir elsewhere")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
