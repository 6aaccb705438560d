"""Evaluation: target and preserve suites, base-versus-tuned reports (``ppft eval``).

- :func:`run_eval` — the whole ``ppft eval`` flow for a recipe (base cache, checkpoint loading, report files).
- :func:`evaluate_suite` — one in-memory model on a list of ``EvalTask`` (used during training).
- :func:`retention_metrics` — flat ``retention/<task>`` metrics from base and current results.
"""

from ..report import Report, TaskComparison, TaskResult, retention
from .runner import resolve_checkpoint, run_eval
from .suite import evaluate_suite, retention_metrics

__all__ = [
    "Report",
    "TaskComparison",
    "TaskResult",
    "evaluate_suite",
    "resolve_checkpoint",
    "retention",
    "retention_metrics",
    "run_eval",
]
