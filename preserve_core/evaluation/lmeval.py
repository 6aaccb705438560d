"""``kind: lm_eval``: lm-evaluation-harness tasks on the in-memory model (optional extra ``ppft[lmeval]``).

Local tasks are YAML files in ``lm_eval_include_path`` (e.g. ``dataset_path: json`` with
``dataset_kwargs.data_files`` pointing at local JSONL), so nothing is downloaded. The task's
score is its first metric (lm-eval's order); with several lm-eval tasks, their mean.
"""

from __future__ import annotations

import math

from ..errors import PPFTError, RecipeError
from ..recipe_schema import EvalTask
from ..report import TaskResult

FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "em", "f1", "mcc", "mc1", "mc2", "pass@1", "brier_score"}
INSTALL_HINT = "kind: lm_eval needs lm-evaluation-harness: pip install 'ppft[lmeval]'"


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RecipeError(INSTALL_HINT) from None
    return lm_eval, HFLM, TaskManager


def task_manager(task: EvalTask, TaskManager):
    """Index only the include folder when it defines every requested task (fast); else add lm-eval's own tasks."""
    if task.lm_eval_include_path:
        local = TaskManager(include_path=task.lm_eval_include_path, include_defaults=False)
        if all(name in local.all_tasks for name in task.lm_eval_tasks):
            return local
    return TaskManager(include_path=task.lm_eval_include_path)


def primary_metric(task_results: dict) -> tuple[str, str]:
    """``(metric, key)`` of the first reported metric: keys look like ``"exact_match,none"``."""
    for key in task_results:
        metric, sep, _ = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            return metric, key
    raise PPFTError(f"lm-eval reported no metric: {sorted(task_results)}")


def _stderr(task_results: dict, key: str) -> float | None:
    metric, _, filt = key.partition(",")
    value = task_results.get(f"{metric}_stderr,{filt}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summarize(task: EvalTask, results: dict) -> TaskResult:
    """One TaskResult from ``simple_evaluate``'s output: the mean of each lm-eval task's primary metric."""
    scores, errors, extra, directions, metrics, n = [], [], {}, set(), set(), 0
    for name in task.lm_eval_tasks:
        if name not in results["results"]:
            raise RecipeError(f"eval task '{task.name}': lm-eval returned no result for '{name}'")
        per_task = results["results"][name]
        metric, key = primary_metric(per_task)
        scores.append(float(per_task[key]))
        errors.append(_stderr(per_task, key))
        directions.add(bool(results.get("higher_is_better", {}).get(name, {}).get(metric, True)))
        metrics.add(metric)
        n += int(results.get("n-samples", {}).get(name, {}).get("effective", 0))
        extra.update(
            {
                f"{name}/{k.partition(',')[0]}": float(v)
                for k, v in per_task.items()
                if "," in k and isinstance(v, (int, float))
            }
        )
    if len(directions) > 1:
        raise RecipeError(
            f"eval task '{task.name}': its lm-eval tasks mix higher- and lower-is-better metrics; split them"
        )
    se = math.sqrt(sum(e**2 for e in errors)) / len(errors) if all(e is not None for e in errors) else None
    unit = "fraction" if metrics <= FRACTION_METRICS else "ratio"
    return TaskResult(
        task.name, task.kind, "/".join(sorted(metrics)), sum(scores) / len(scores), n, se,
        higher_is_better=directions.pop(), unit=unit, extra=extra,
    )  # fmt: skip


def run_lm_eval_task(model, tokenizer, task: EvalTask, batch_size: int) -> TaskResult:
    """Run ``task.lm_eval_tasks`` with lm-eval's ``HFLM`` wrapped around the in-memory model."""
    if not task.lm_eval_tasks:
        raise RecipeError(f"eval task '{task.name}': kind lm_eval needs lm_eval_tasks: [<task name>, ...]")
    lm_eval, HFLM, TaskManager = import_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task.lm_eval_tasks),
        task_manager=task_manager(task, TaskManager),
        limit=task.limit,
        log_samples=False,
        bootstrap_iters=1000,
    )
    if results is None:
        raise RecipeError(f"eval task '{task.name}': lm-eval returned nothing (not the main process?)")
    return summarize(task, results)
