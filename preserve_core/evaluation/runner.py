"""``run_eval``: the base model and the tuned checkpoint on the recipe's eval suites, compared.

The base is evaluated first (tasks found in the base cache are skipped), then the tuned model is
loaded: a PEFT adapter is attached to the same base instance (no second copy in memory), a full
model folder is loaded on its own (keeping the base only when a ``kl_to_base`` task needs it).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import RecipeError
from ..models import load_model, load_tokenizer, model_fingerprint
from ..recipe_schema import EvalTask, ModelConfig
from ..report import Report, TaskResult, compare, write_report
from .cache import BaseCache, cache_dir
from .suite import check_unique_names, evaluate_suite

Progress = Callable[[str], None]


def resolve_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> tuple[Path, str]:
    """``(path, "adapter" | "full")``: ``checkpoint`` or ``<run_dir>/final``, told apart by the files present."""
    path = Path(checkpoint) if checkpoint else Path(run_dir) / "final"
    if not path.exists():
        how = f"--checkpoint {path} does not exist" if checkpoint else f"no trained model at {path}"
        raise RecipeError(f"{how}: run `ppft train` first, or pass --checkpoint PATH (a model or PEFT adapter folder)")
    if (path / "adapter_config.json").exists():
        return path, "adapter"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path, "full"
    if (path / "trainable.safetensors").exists():
        raise RecipeError(f"{path} is a resumable training checkpoint, not a model: evaluate the run's final/ folder")
    raise RecipeError(f"{path}: expected a PEFT adapter (adapter_config.json) or a model (config.json + *.safetensors)")


def eval_model_config(cfg: ModelConfig, path: str | None = None) -> ModelConfig:
    """The recipe's model settings for inference: no gradient checkpointing (it disables the KV cache)."""
    update = {"gradient_checkpointing": False}
    if path is not None:
        update.update(name_or_path=str(path), revision=None)
    return cfg.model_copy(update=update)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tuned(recipe, path: Path, kind: str, base, device):
    """The tuned model: ``PeftModel.from_pretrained(base, path)`` for an adapter, else the full model folder."""
    if kind == "adapter":
        from peft import PeftModel

        base = base if base is not None else load_model(eval_model_config(recipe.model), device)
        return PeftModel.from_pretrained(base, str(path))
    return load_model(eval_model_config(recipe.model, path), device)


def kl_base_result(task: EvalTask) -> TaskResult:
    """KL(base || base) is 0 by definition."""
    return TaskResult(task.name, task.kind, "kl", 0.0, 0, 0.0, higher_is_better=False, unit="nats")


def base_results(base, tokenizer, tasks: list[EvalTask], batch_size: int, cache: BaseCache, progress: Progress):
    """``({name: TaskResult}, {names read from the cache})``; fresh results are stored in the cache."""
    found, cached, todo = {}, set(), []
    for task in tasks:
        hit = kl_base_result(task) if task.kind == "kl_to_base" else cache.get(task)
        if hit is None:
            todo.append(task)
            continue
        found[task.name] = hit
        if task.kind != "kl_to_base":
            cached.add(task.name)
    if todo:
        fresh = evaluate_suite(base, tokenizer, todo, batch_size, on_task=lambda t: progress(f"base: {t.name}"))
        for task in todo:
            cache.put(task, fresh[task.name])
        found.update(fresh)
    return {t.name: found[t.name] for t in tasks}, cached


def run_eval(
    recipe,
    checkpoint: str | Path | None = None,
    fail_on_regression: float | None = None,
    progress: Progress | None = None,
) -> Report:
    """Evaluate base and tuned on ``recipe.eval``; write ``<run_dir>/eval/report.{json,md}``; return the report.

    ``fail_on_regression`` (points) overrides ``recipe.eval.fail_on_regression``; the report's
    ``passed`` is False when a preserve task lost more than that many points.
    """
    progress = progress or (lambda message: None)
    suites = [("target", t) for t in recipe.eval.target] + [("preserve", t) for t in recipe.eval.preserve]
    if not suites:
        raise RecipeError(
            "the recipe's eval: section has no tasks: add eval.target and/or eval.preserve (see docs/eval.md)"
        )
    tasks = [t for _, t in suites]
    check_unique_names(tasks)
    path, kind = resolve_checkpoint(recipe.run_dir(), checkpoint)
    threshold = fail_on_regression if fail_on_regression is not None else recipe.eval.fail_on_regression
    device, batch_size = default_device(), recipe.eval.batch_size

    tokenizer = load_tokenizer(recipe.model)
    base = load_model(eval_model_config(recipe.model), device)
    fingerprint = model_fingerprint(base)
    cache = BaseCache(cache_dir(recipe.run_dir()), fingerprint, tokenizer, recipe.model.dtype)
    base_scores, cached = base_results(base, tokenizer, tasks, batch_size, cache, progress)

    if kind == "full" and not any(t.kind == "kl_to_base" for t in tasks):
        base = None
        gc.collect()
    tuned = load_tuned(recipe, path, kind, base, device)
    kl_reference = base if kind == "full" else None  # adapters: the same model with the adapter disabled
    tuned_scores = evaluate_suite(
        tuned, tokenizer, tasks, batch_size, kl_reference, on_task=lambda t: progress(f"tuned: {t.name}")
    )

    report = Report(
        recipe=recipe.name or "recipe", base_model=recipe.model.name_or_path, checkpoint=str(path), checkpoint_kind=kind,
        base_fingerprint=fingerprint, fail_on_regression=threshold,
        tasks=[compare(suite, base_scores[t.name], tuned_scores[t.name], threshold, t.name in cached) for suite, t in suites],
        samples={t.name: {"base": base_scores[t.name].samples, "tuned": tuned_scores[t.name].samples} for t in tasks if tuned_scores[t.name].samples},
    )  # fmt: skip
    write_report(report, recipe.run_dir() / "eval")
    return report
