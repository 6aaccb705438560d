"""``ppft calibrate``: preserve texts -> C_p, task examples -> C_t, method extras -> one folder."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import load_rows
from ..errors import PPFTError, RecipeError
from ..locks import exclusive_lock
from ..models import model_fingerprint, resolve_target_modules
from ..progress import notice
from .batches import encode_preserve_text, preserve_batches, task_batches
from .dist import Dist
from .identity import calibration_identity, same_identity
from .sampling import sample_preserve_texts
from .layout import InputLayout, discover_layout
from .gram import upper_gram_bytes
from .stats import input_dims, input_stats_passes, plan_passes, stats_budget_bytes
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


def dataset_texts(path: str, limit: int, seed: int) -> list[str]:
    """``limit`` non-empty values of column ``text``, drawn uniformly without replacement (seeded), in
    file order; every one when there are no more than ``limit``.

    Drawn, not the file's head: a file written topic by topic (or skill by skill) would otherwise
    calibrate on its first topic only, and FORA protects only what calibration covers.
    """
    rows = load_rows(path)
    if "text" not in rows.column_names:
        raise RecipeError(f"calibration.preserve_data: {path} needs a 'text' column; it has {rows.column_names}")
    texts = [t for t in rows["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise RecipeError(f"calibration.preserve_data: {path} has no non-empty text")
    if len(texts) <= limit:
        return texts
    drawn = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:limit]
    return [texts[i] for i in sorted(drawn.tolist())]


SAMPLING_KEYS = ("num_samples", "batch_size", "max_new_tokens", "temperature", "top_p", "start", "seed_prompts", "seed",
                 "min_new_tokens", "max_repeat_fraction")


def preserve_data(recipe, model: nn.Module, tokenizer, dist: Dist, fingerprint: str):
    """``(texts, ids, sidecar)``: the preserve texts, their token ids (exactly as sampled; None for
    a data set, which is tokenized as ``[bos] + text``) and the record of how they were made."""
    cfg = recipe.calibration
    if cfg.preserve_source == "dataset":
        texts = dataset_texts(cfg.preserve_data, cfg.num_samples, cfg.seed)
        return texts, None, {"source": "dataset", "path": cfg.preserve_data, "count": len(texts)}
    samples, report = sample_preserve_texts(model, tokenizer, cfg, dist)
    settings = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    sidecar = {"source": "sample", "settings": settings, "model_fingerprint": fingerprint, "report": asdict(report)}
    return [s.text for s in samples], [s.ids for s in samples], sidecar


def _texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


STATS = ("preserve", "task")
_NEED_OF = {"preserve": "preserve_stats", "task": "task_stats"}  # methods.base PRESERVE_STATS / TASK_STATS


def stats_needed(method_cls, options) -> list[str]:
    """The statistics (``preserve``: C_p, ``task``: C_t) the configured method reads, in that order."""
    needs = method_cls.needs_for(options)
    return [which for which in STATS if _NEED_OF[which] in needs]


def _counts_section(counts: dict[str, dict[str, int]], keys: list[str], n_task: int | None, n_texts: int) -> dict:
    """``counts[which][key]`` = tokens -> the manifest's ``counts`` (only the statistics present)."""
    return {
        "tokens": {which: min(c.values()) for which, c in counts.items()},
        "per_key": {k: {which: c[k] for which, c in counts.items()} for k in keys},
        "preserve_texts": n_texts,
        "task_examples": n_task,
    }


def build_manifest(identity: dict, texts: list[str], n_task: int | None, result: "StatsResult", dist: Dist) -> dict:
    layout = result.layout
    return {
        "format": FORMAT,
        "version": VERSION,
        **{k: identity[k] for k in ("model_fingerprint", "settings_hash", "data_hash")},
        "settings": identity["settings"],
        "data": {**identity["data"], "preserve_texts_sha256": _texts_sha256(texts)},
        "counts": _counts_section(result.counts, layout.keys, n_task, len(texts)),
        "stats": sorted(result.counts),
        "module_to_key": layout.module_to_key,
        "keys": {
            k: {"dim": result.dims[k], "modules": [m for m, mk in layout.module_to_key.items() if mk == k]}
            for k in layout.keys
        },
        "extras": [],
        "num_processes": dist.world,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_counts(which: str, counts: dict[str, int]) -> None:
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        hint = " (no loss positions? try calibration.task_positions: all)" if which == "task" else ""
        raise PPFTError(f"{which} statistics saw no tokens for {empty[:3]}{hint}")


MIN_TOKENS_PER_DIM = 4  # below this many tokens per input dimension a C's small eigenvalues are mostly noise


def thin_inputs(counts: dict[str, int], dims: dict[str, int], factor: int = MIN_TOKENS_PER_DIM) -> dict[str, tuple[int, int]]:
    """``{key: (tokens, width)}`` for the inputs whose statistic saw fewer than ``factor * width`` tokens.

    An ``n x n`` second moment from ``N < n`` tokens has rank at most ``N``; with ``N`` a few times ``n``
    its tail eigenvalues (those that decide which directions FORA leaves open) are still dominated by
    sampling noise.
    """
    return {k: (counts[k], dims[k]) for k in counts if counts[k] < factor * dims[k]}


def warn_thin(which: str, counts: dict[str, int], dims: dict[str, int]) -> None:
    """One warning naming how many inputs were calibrated on too few tokens, and the worst of them."""
    thin = thin_inputs(counts, dims)
    if not thin:
        return
    key, (tokens, width) = min(thin.items(), key=lambda kv: kv[1][0] / kv[1][1])
    hint = "calibration.num_samples or max_new_tokens" if which == "preserve" else "calibration.max_task_examples"
    notice(
        f"{which} statistics of {len(thin)} of {len(counts)} layer inputs saw fewer than "
        f"{MIN_TOKENS_PER_DIM} tokens per dimension (worst: {key}, {tokens} tokens for width {width}); "
        f"their small eigenvalues are mostly noise: raise {hint}"
    )


@dataclass
class StatsResult:
    """The statistics of one calibration: ``covs[which][key]`` packed upper triangles of ``C`` (float32,
    CPU; only on the writing rank), ``counts[which][key]`` tokens, the layout and the input widths."""

    layout: InputLayout
    dims: dict[str, int]
    covs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    n_task: int | None = None


def compute_stats(recipe, model: nn.Module, tokenizer, sequences: list[list[int]], which: list[str], dist: Dist) -> StatsResult:
    """C_p (preserve ``sequences``, every token) and/or C_t (task examples, ``task_positions``), one after
    the other, each in as many passes as ``calibration.stats_memory_gb`` asks (:func:`.stats.plan_passes`):
    a pass's sums leave the device (packed, to the CPU) before the next pass starts."""
    cfg = recipe.calibration
    targets = resolve_target_modules(model, recipe.model.target_modules)
    device = next(model.parameters()).device
    layout = discover_layout(model, targets, device)
    result = StatsResult(layout, input_dims(model, layout))
    budget = stats_budget_bytes(cfg.stats_memory_gb, device, dist)
    if dist.is_main:
        _note_passes(plan_passes(layout, result.dims, budget), result.dims, budget)
    for w in which:
        if w == "preserve":
            batches, positions = preserve_batches(sequences, tokenizer, recipe.data.max_length, cfg.stats_batch_size), "all"
        else:
            (batches, result.n_task), positions = task_batches(recipe, tokenizer), cfg.task_positions
        counts, covs = _stats_over(model, targets, batches, positions, dist, budget)
        counts = {k: counts[k] for k in layout.keys}
        _check_counts(w, counts)
        if dist.is_main:
            warn_thin(w, counts, result.dims)
        result.counts[w] = counts
        result.covs[w] = {k: covs[k] for k in layout.keys} if dist.is_main else {}
    return result


def _stats_over(model, targets, batches, positions: str, dist: Dist, budget) -> tuple[dict, dict]:
    """``(tokens per input, packed C per input on the CPU)`` over ``positions`` of ``batches``. ``balanced``:
    ``C = (C_loss + C_all) / 2`` (float64 sum, stored float32) with the loss positions' counts, the scarcer."""
    if positions != "balanced":
        return _stats_at(model, targets, batches, positions, dist, budget)
    counts, covs = _stats_at(model, targets, batches, "loss", dist, budget)
    every = _stats_at(model, targets, batches, "all", dist, budget)[1]
    for k in list(covs):  # in place: two sets of matrices at the peak, not three
        covs[k] = (covs[k].double() / 2 + every.pop(k).double() / 2).float()
    return counts, covs


def _stats_at(model, targets, batches, positions: str, dist: Dist, budget) -> tuple[dict, dict]:
    """One statistic's passes over ``batches`` at ``positions`` (``loss`` or ``all``)."""
    counts, covs = {}, {}
    for part in input_stats_passes(model, targets, batches, positions, dist, budget):
        counts |= part.counts
        covs |= part.pop_packed_covs("cpu") if dist.is_main else {}
        del part
    return counts, covs


def _note_passes(passes: list[list[str]], dims: dict[str, int], budget: int | None) -> None:
    """Say so when the statistics take more than one pass over the data."""
    if len(passes) == 1:
        return
    need = sum(upper_gram_bytes(n) for n in dims.values())
    widest = max(upper_gram_bytes(n) for n in dims.values())
    floor = f"; the widest input alone needs {widest / 1e9:.2f} GB" if widest > budget else ""
    notice(
        f"calibration statistics: {len(passes)} passes over the data per statistic, to hold at most "
        f"{budget / 1e9:.2f} GB of sums at once (all {len(dims)} inputs together: {need / 1e9:.2f} GB){floor}"
    )


def _write(directory: Path, manifest: dict, preserve: tuple, result: StatsResult, extras: dict) -> None:
    def fill(tmp: Path) -> None:
        write_texts(tmp, *preserve)
        for which, covs in result.covs.items():
            save_tensors(tmp / STATS_FILES[which], covs)
        for name, tensors in extras.items():
            save_tensors(tmp / EXTRAS / f"{name}.safetensors", tensors)
        write_json(tmp / MANIFEST, {**manifest, "extras": sorted(extras)})

    replace_dir_atomically(directory, fill)


def extra_providers(recipe, method_cls) -> dict:
    """``{extra name: fn(model, tokenizer, preserve_texts) -> tensors}``: the method's own extra (under
    its name) and each of ``method.regularizers``' (under the regulariser's name), where they add one."""
    from functools import partial

    from ..methods.regularizers import REGULARIZERS

    providers = {}
    if method_cls.has_calibration_extra(recipe.method):
        providers[method_cls.name] = partial(_method_extra, method_cls, recipe=recipe)
    for options in recipe.method.regularizers:
        reg = REGULARIZERS[options.name]
        if reg.has_calibration_extra(options):
            providers[reg.name] = partial(reg.calibrate_extra, recipe=recipe, options=options)
    return providers


def _method_extra(method_cls, model, tokenizer, preserve_texts, recipe):
    return method_cls.calibrate_extra(model, tokenizer, preserve_texts, recipe)


def _compute_then_write(model: nn.Module, dist: Dist, directory: Path, compute, write) -> Calibration:
    """``write(compute())`` in eval mode, then the folder as written.

    ``compute()`` runs on every rank (it may use collectives); ``write`` on rank 0 only, where any error
    it raises is caught and then raised on every rank (:meth:`Dist.broadcast_error`), or the others would
    wait forever in the next collective. The model's train mode is restored either way.
    """
    was_training = model.training
    model.eval()
    error = None
    try:
        computed = compute()
        if dist.is_main:
            try:
                write(computed)
            except BaseException as e:  # every rank must hear of it
                error = e
    finally:
        model.train(was_training)
    dist.broadcast_error(error)
    return Calibration(directory, read_manifest(directory))


def _run(recipe, model: nn.Module, tokenizer, method_cls, dist: Dist, identity: dict, which: list[str]) -> Calibration:
    directory = recipe.calibration_dir()

    def compute():
        texts, ids, sidecar = preserve_data(recipe, model, tokenizer, dist, identity["model_fingerprint"])
        sequences = ids if ids is not None else [encode_preserve_text(tokenizer, t, recipe.data.max_length) for t in texts]
        return (texts, ids, sidecar), compute_stats(recipe, model, tokenizer, sequences, which, dist)

    def write(computed) -> None:
        (texts, ids, sidecar), result = computed
        extras = {name: fn(model, tokenizer, texts) for name, fn in extra_providers(recipe, method_cls).items()}
        manifest = build_manifest(identity, texts, result.n_task, result, dist)
        _write(directory, manifest, (texts, ids, sidecar), result, extras)

    return _compute_then_write(model, dist, directory, compute, write)


def run_calibration(
    recipe, model: nn.Module, tokenizer, method_cls, accelerator=None, stats: list[str] | None = None
) -> Calibration:
    """Compute and save calibration into ``recipe.calibration_dir()`` (replacing what is there).

    ``model`` is the unwrapped base model (before ``prepare_model``), on its device. With an
    ``accelerator``, sampling and statistics are sharded over its processes and only rank 0 writes.
    ``stats``: which of ``preserve`` (C_p) / ``task`` (C_t) to compute; default: what the recipe's
    method reads (:func:`stats_needed`), nothing more.
    """
    dist = Dist(accelerator)
    which = _ordered(stats if stats is not None else stats_needed(method_cls, recipe.method))
    return _run(recipe, model, tokenizer, method_cls, dist, calibration_identity(recipe, model, tokenizer), which)


def _ordered(which) -> list[str]:
    unknown = set(which) - set(STATS)
    if unknown:
        raise PPFTError(f"unknown calibration statistics {sorted(unknown)}; choose from {list(STATS)}")
    return [w for w in STATS if w in which]


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


def _add_missing_extra(cal: Calibration, model: nn.Module, tokenizer, method_cls, recipe, dist: Dist) -> Calibration:
    """Reused output made for another method: compute the extras this run needs and add them in place."""
    missing = {n: fn for n, fn in extra_providers(recipe, method_cls).items() if n not in cal.manifest.get("extras", [])}
    if not missing:
        return cal

    def write(_) -> None:
        for name, fn in missing.items():
            final = cal.dir / EXTRAS / f"{name}.safetensors"
            tmp = final.with_name(f".{final.name}.tmp")
            save_tensors(tmp, fn(model, tokenizer, cal.preserve_texts))
            tmp.replace(final)
        manifest = read_manifest(cal.dir)
        write_json(cal.dir / MANIFEST, {**manifest, "extras": sorted({*manifest["extras"], *missing})})

    return _compute_then_write(model, dist, cal.dir, lambda: None, write)


def ensure_calibration(
    recipe, model: nn.Module, tokenizer, method_cls, accelerator=None, force: bool = False, stats: list[str] | None = None
) -> Calibration:
    """Reuse ``recipe.calibration_dir()`` when it matches (same model fingerprint, settings hash and
    data hash), adding the statistics and extras it lacks; otherwise (or with ``force``) compute it
    afresh. ``stats`` as in :func:`run_calibration`. ``.reused`` tells which happened."""
    dist = Dist(accelerator)
    # Single processes sharing the folder (parallel bench cells) take turns: one computes, the others reuse.
    lock = exclusive_lock(recipe.calibration_dir()) if dist.world == 1 else contextlib.nullcontext()
    with lock:
        return _ensure(recipe, model, tokenizer, method_cls, dist, force, stats)


def _ensure(recipe, model: nn.Module, tokenizer, method_cls, dist: Dist, force: bool, stats: list[str] | None) -> Calibration:
    identity = calibration_identity(recipe, model, tokenizer)
    which = _ordered(stats if stats is not None else stats_needed(method_cls, recipe.method))
    manifest = read_manifest(recipe.calibration_dir())
    if not force and manifest is not None and manifest.get("version") == VERSION and same_identity(manifest, identity):
        cal = Calibration(recipe.calibration_dir(), manifest)
        cal = _add_missing_stats(cal, model, tokenizer, recipe, which, dist)
        cal = _add_missing_extra(cal, model, tokenizer, method_cls, recipe, dist)
        cal.reused = True
        return cal
    return _run(recipe, model, tokenizer, method_cls, dist, identity, which)


def _add_missing_stats(cal: Calibration, model: nn.Module, tokenizer, recipe, which: list[str], dist: Dist) -> Calibration:
    """Reused output without some statistic the method reads: compute it from the stored preserve
    tokens / the task data and add it in place (file first, then the manifest)."""
    missing = [w for w in which if w not in cal.stats()]
    if not missing:
        return cal

    def compute() -> StatsResult:
        sequences = cal.preserve_sequences(tokenizer, recipe.data.max_length)
        return compute_stats(recipe, model, tokenizer, sequences, missing, dist)

    return _compute_then_write(model, dist, cal.dir, compute, lambda result: _add_stats_files(cal, result))


def _add_stats_files(cal: Calibration, result: StatsResult) -> None:
    for which, covs in result.covs.items():
        final = cal.dir / STATS_FILES[which]
        tmp = final.with_name(f".{final.name}.tmp")
        save_tensors(tmp, covs)
        tmp.replace(final)
    old = cal.manifest["counts"]
    counts = {w: {k: n[w] for k, n in old["per_key"].items()} for w in cal.stats()} | result.counts
    n_task = result.n_task if result.n_task is not None else old.get("task_examples")
    section = _counts_section(counts, cal.keys(), n_task, old["preserve_texts"])
    write_json(cal.dir / MANIFEST, {**cal.manifest, "counts": section, "stats": sorted(counts)})
