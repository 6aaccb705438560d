"""What a calibration output depends on, as three hashes checked before reuse.

- ``model_fingerprint``: :func:`preserve_core.models.model_fingerprint` of the unwrapped model.
- ``settings_hash``: the ``calibration:`` section (less ``dir`` and ``stats_memory_gb``), the resolved target layers, the
  task tokenization settings and the tokenizer's vocabulary.
- ``data_hash``: the task data file (sha256; the name for hub / lab refs) and, for
  ``preserve_source: dataset``, the preserve data file.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from ..data import data_fingerprint
from ..models import model_fingerprint, resolve_target_modules


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return _hash([sorted(tokenizer.get_vocab().items()), specials])


def calibration_settings(recipe, model: nn.Module, tokenizer) -> dict:
    """The settings an output is a function of (besides weights and data)."""
    calibration = recipe.calibration.model_dump(mode="json", exclude={"dir", "stats_memory_gb"})  # neither changes the output
    data = recipe.data.model_dump(mode="json", exclude={"train", "eval"})
    if recipe.calibration.preserve_source == "dataset":
        calibration["dataset_rows"] = "seeded-draw"  # was the file's first rows: folders made that way are redone
    return {
        "calibration": calibration,
        "target_modules": resolve_target_modules(model, recipe.model.target_modules),
        "task_tokenization": data,
        "tokenizer": tokenizer_hash(tokenizer),
    }


def data_sources(recipe) -> dict:
    preserve = recipe.calibration.preserve_data if recipe.calibration.preserve_source == "dataset" else None
    return {
        "task": {"source": recipe.data.train, "fingerprint": data_fingerprint(recipe.data.train)},
        "preserve": {"source": preserve, "fingerprint": data_fingerprint(preserve) if preserve else None},
    }


def calibration_identity(recipe, model: nn.Module, tokenizer) -> dict:
    """``{"model_fingerprint", "settings_hash", "data_hash"}`` plus the settings and data behind them."""
    settings = calibration_settings(recipe, model, tokenizer)
    data = data_sources(recipe)
    return {
        "model_fingerprint": model_fingerprint(model),
        "settings_hash": _hash(settings),
        "data_hash": _hash(data),
        "settings": settings,
        "data": data,
    }


IDENTITY_KEYS = ("model_fingerprint", "settings_hash", "data_hash")


def same_identity(manifest: dict, identity: dict) -> bool:
    return all(manifest.get(k) == identity[k] for k in IDENTITY_KEYS)
