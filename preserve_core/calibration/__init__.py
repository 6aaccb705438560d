"""Calibration for capability-preserving fine-tuning (``ppft calibrate``).

Preserve data (samples of the model itself, or user text), the uncentred input second moments
``C_p`` / ``C_t`` of every target linear layer, and per-method extras, saved in one folder.
See docs/calibration.md.
"""

from .pipeline import ensure_calibration, load_calibration, run_calibration, stats_needed
from .stats import collect_input_stats, token_mask
from .store import Calibration
from .summary import effective_ranks, summary_rows

__all__ = [
    "Calibration",
    "collect_input_stats",
    "effective_ranks",
    "ensure_calibration",
    "load_calibration",
    "run_calibration",
    "stats_needed",
    "summary_rows",
    "token_mask",
]
