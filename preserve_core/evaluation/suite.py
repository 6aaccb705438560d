"""``evaluate_suite``: every task of a suite on one in-memory model (also called by the training engine)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import RecipeError
from ..recipe_schema import EvalTask
from ..report import TaskResult, retention
from .scoring import eval_mode
from .tasks import run_task

OnTask = Callable[[EvalTask], None]


def check_unique_names(tasks: list[EvalTask]) -> None:
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise RecipeError(
                f"eval: two tasks are named '{task.name}'; task names must be unique across target and preserve"
            )
        seen.add(task.name)


def evaluate_suite(
    model, tokenizer, tasks: list[EvalTask], batch_size: int, base_model=None, on_task: OnTask | None = None
) -> dict[str, TaskResult]:
    """Score ``model`` on each task; ``{task.name: TaskResult}`` in task order.

    ``base_model`` is only read by ``kl_to_base`` (a PEFT model without it compares against itself
    with the adapter disabled). Both models are put in eval mode and restored afterwards, and the
    encoded task data is cached per tokenizer, so calling this every N training steps only costs
    the forward passes. Runs on whatever device the model is on; call it on every rank or on one.
    """
    check_unique_names(tasks)
    results: dict[str, TaskResult] = {}
    base_ctx = eval_mode(base_model) if base_model is not None else contextlib.nullcontext()
    with eval_mode(model), base_ctx:
        for task in tasks:
            if on_task:
                on_task(task)
            results[task.name] = run_task(model, tokenizer, task, batch_size, base_model)
    return results


def retention_metrics(
    base: dict[str, TaskResult], tuned: dict[str, TaskResult], prefix: str = "preserve"
) -> dict[str, float]:
    """Flat metrics for a log line: ``{prefix}/<task>`` score, ``retention/<task>`` and ``retention/mean``.

    Retention is tuned/base for higher-is-better metrics and base/tuned for lower-is-better ones
    (perplexity), so 1.0 means kept; KL tasks log their score only.
    """
    out: dict[str, float] = {}
    ratios: list[float] = []
    for name, result in tuned.items():
        out[f"{prefix}/{name}"] = result.score
        ratio = retention(base[name], result) if name in base else None
        if ratio is not None:
            out[f"retention/{name}"] = ratio
            ratios.append(ratio)
    if ratios:
        out["retention/mean"] = sum(ratios) / len(ratios)
    return out
