"""``ppft calibrate``: preserve texts -> C_p, task examples -> C_t, method extras -> one folder."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..data import load_rows
from ..errors import PPFTError, RecipeError
from ..models import model_fingerprint
from .batches import encode_preserve_text, preserve_batches, task_batches
from .dist import Dist
from .identity import calibration_identity, same_identity
from .sampling import sample_preserve_texts
from .stats import InputStats, accumulate_input_stats
from .store import (
    EXTRAS,
    FORMAT,
    MANIFEST,
    STATS_FILES,
    VERSION,
    Calibration,
    read_manifest,
    replace_dir_atomically,
    save_tensors,
    write_json,
    write_texts,
)


def dataset_texts(path: str, limit: int) -> list[str]:
    """The first ``limit`` non-empty values of column ``text`` of a label-free data file."""
    rows = load_rows(path)
    if "text" not in rows.column_names:
        raise RecipeError(f"calibration.preserve_data: {path} needs a 'text' column; it has {rows.column_names}")
    texts = [t for t in rows["text"] if isinstance(t, str) and t.strip()][:limit]
    if not texts:
        raise RecipeError(f"calibration.preserve_data: {path} has no non-empty text")
    return texts


SAMPLING_KEYS = ("num_samples", "batch_size", "max_new_tokens", "temperature", "top_p", "start", "seed_prompts", "seed",
                 "min_new_tokens", "max_repeat_fraction")


def preserve_data(recipe, model: nn.Module, tokenizer, dist: Dist, fingerprint: str):
    """``(texts, ids, sidecar)``: the preserve texts, their token ids (exactly as sampled; None for
    a data set, which is tokenized as ``[bos] + text``) and the record of how they were made."""
    cfg = recipe.calibration
    if cfg.preserve_source == "dataset":
        texts = dataset_texts(cfg.preserve_data, cfg.num_samples)
        return texts, None, {"source": "dataset", "path": cfg.preserve_data, "count": len(texts)}
    samples, report = sample_preserve_texts(model, tokenizer, cfg, dist)
    settings = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    sidecar = {"source": "sample", "settings": settings, "model_fingerprint": fingerprint, "report": asdict(report)}
    return [s.text for s in samples], [s.ids for s in samples], sidecar


def _texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def build_manifest(identity: dict, texts: list[str], n_task: int, stats: dict[str, InputStats], dist: Dist) -> dict:
    layout = stats["preserve"].layout
    dims = {k: int(stats["preserve"].sums[k].shape[0]) for k in layout.keys}
    return {
        "format": FORMAT,
        "version": VERSION,
        **{k: identity[k] for k in ("model_fingerprint", "settings_hash", "data_hash")},
        "settings": identity["settings"],
        "data": {**identity["data"], "preserve_texts_sha256": _texts_sha256(texts)},
        "counts": {
            "tokens": {which: min(s.counts.values()) for which, s in stats.items()},
            "per_key": {k: {which: s.counts[k] for which, s in stats.items()} for k in layout.keys},
            "preserve_texts": len(texts),
            "task_examples": n_task,
        },
        "module_to_key": layout.module_to_key,
        "keys": {k: {"dim": dims[k], "modules": [m for m, mk in layout.module_to_key.items() if mk == k]} for k in layout.keys},
        "extras": [],
        "num_processes": dist.world,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_counts(stats: dict[str, InputStats]) -> None:
    for which, s in stats.items():
        empty = [k for k, n in s.counts.items() if n == 0]
        if empty:
            hint = " (no loss positions? try calibration.task_positions: all)" if which == "task" else ""
            raise PPFTError(f"{which} statistics saw no tokens for {empty[:3]}{hint}")


def _write(directory: Path, manifest: dict, preserve: tuple, stats: dict[str, InputStats], extras: dict) -> None:
    def fill(tmp: Path) -> None:
        write_texts(tmp, *preserve)
        for which, s in stats.items():
            save_tensors(tmp / STATS_FILES[which], s.into_covs())
        for name, tensors in extras.items():
            save_tensors(tmp / EXTRAS / f"{name}.safetensors", tensors)
        write_json(tmp / MANIFEST, {**manifest, "extras": sorted(extras)})

    replace_dir_atomically(directory, fill)


def _compute(recipe, model: nn.Module, tokenizer, dist: Dist, identity: dict):
    """Preserve texts and both statistics (every rank takes part and gets the reduced result)."""
    cfg = recipe.calibration
    texts, ids, sidecar = preserve_data(recipe, model, tokenizer, dist, identity["model_fingerprint"])
    sequences = ids if ids is not None else [encode_preserve_text(tokenizer, t, recipe.data.max_length) for t in texts]
    targets = identity["settings"]["target_modules"]
    batches = preserve_batches(sequences, tokenizer, recipe.data.max_length, cfg.stats_batch_size)
    stats = {"preserve": accumulate_input_stats(model, targets, batches, "all", dist)}
    batches, n_task = task_batches(recipe, tokenizer)
    stats["task"] = accumulate_input_stats(model, targets, batches, cfg.task_positions, dist)
    _check_counts(stats)
    return (texts, ids, sidecar), stats, n_task


def _run(recipe, model: nn.Module, tokenizer, method_cls, dist: Dist, identity: dict) -> Calibration:
    directory = recipe.calibration_dir()
    was_training = model.training
    model.eval()
    error = None
    try:
        preserve, stats, n_task = _compute(recipe, model, tokenizer, dist, identity)
        if dist.is_main:
            try:
                extras = {method_cls.name: method_cls.calibrate_extra(model, tokenizer, preserve[0], recipe)}
                manifest = build_manifest(identity, preserve[0], n_task, stats, dist)
                _write(directory, manifest, preserve, stats, extras)
            except BaseException as e:  # every rank must hear of it, or the others wait forever
                error = e
    finally:
        model.train(was_training)
    dist.broadcast_error(error)
    return Calibration(directory, read_manifest(directory))


def run_calibration(recipe, model: nn.Module, tokenizer, method_cls, accelerator=None) -> Calibration:
    """Compute and save calibration into ``recipe.calibration_dir()`` (replacing what is there).

    ``model`` is the unwrapped base model (before ``prepare_model``), on its device. With an
    ``accelerator``, sampling and statistics are sharded over its processes and only rank 0 writes.
    """
    dist = Dist(accelerator)
    return _run(recipe, model, tokenizer, method_cls, dist, calibration_identity(recipe, model, tokenizer))


def load_calibration(recipe, model: nn.Module) -> Calibration:
    """The calibration in ``recipe.calibration_dir()``; RecipeError unless it was made for ``model``."""
    directory = recipe.calibration_dir()
    manifest = read_manifest(directory)
    if manifest is None:
        raise RecipeError(f"no calibration output in {directory}: run `ppft calibrate <recipe>` first")
    redo = "Run `ppft calibrate <recipe> --force` to recompute it, or point calibration.dir elsewhere."
    if manifest.get("version") != VERSION:
        raise RecipeError(f"calibration in {directory} has format version {manifest.get('version')}, not {VERSION}. {redo}")
    fingerprint = model_fingerprint(model)
    if manifest["model_fingerprint"] != fingerprint:
        raise RecipeError(
            f"calibration in {directory} was computed for another model (fingerprint {manifest['model_fingerprint']}, "
            f"this model {fingerprint}). {redo}"
        )
    return Calibration(directory, manifest)


def _has_own_extra(method_cls) -> bool:
    from ..methods.base import Method

    return getattr(method_cls.calibrate_extra, "__func__", None) is not Method.calibrate_extra.__func__


def _add_missing_extra(cal: Calibration, model: nn.Module, tokenizer, method_cls, recipe, dist: Dist) -> Calibration:
    """Reused output made for another method: compute this method's extras and add them in place."""
    if method_cls.name in cal.manifest.get("extras", []) or not _has_own_extra(method_cls):
        return cal
    error = None
    if dist.is_main:
        was_training = model.training
        model.eval()
        try:
            tensors = method_cls.calibrate_extra(model, tokenizer, cal.preserve_texts, recipe)
            final = cal.dir / EXTRAS / f"{method_cls.name}.safetensors"
            tmp = final.with_name(f".{final.name}.tmp")
            save_tensors(tmp, tensors)
            tmp.replace(final)
            write_json(cal.dir / MANIFEST, {**cal.manifest, "extras": sorted({*cal.manifest["extras"], method_cls.name})})
        except BaseException as e:
            error = e
        finally:
            model.train(was_training)
    dist.broadcast_error(error)
    return Calibration(cal.dir, read_manifest(cal.dir))


def ensure_calibration(recipe, model: nn.Module, tokenizer, method_cls, accelerator=None, force: bool = False) -> Calibration:
    """Reuse ``recipe.calibration_dir()`` when it matches (same model fingerprint, settings hash and
    data hash); otherwise (or with ``force``) compute it afresh. ``.reused`` tells which happened."""
    dist = Dist(accelerator)
    identity = calibration_identity(recipe, model, tokenizer)
    manifest = read_manifest(recipe.calibration_dir())
    if not force and manifest is not None and manifest.get("version") == VERSION and same_identity(manifest, identity):
        cal = _add_missing_extra(Calibration(recipe.calibration_dir(), manifest), model, tokenizer, method_cls, recipe, dist)
        cal.reused = True
        return cal
    return _run(recipe, model, tokenizer, method_cls, dist, identity)
