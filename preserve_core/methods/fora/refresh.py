"""FORA full form: re-estimating ``Q`` on the current model's activations (``refresh_every``; ours).

The spec fixes ``Q`` from the base model's ``C_p``. But every layer's update moves the preserve inputs
of the layers after it, so a fixed ``Q`` stops spanning them (the compounding leak measured in
docs/methods/fora.md). Every ``refresh_every`` optimizer steps the first ``refresh_samples``
calibration preserve sequences run through the model being trained (no grad, eval mode); each
target input's ``C_p`` is measured again on these current activations and ``Q`` recomputed with the
same ``energy`` / ``rank`` / ``max_rank``, one input at a time and within ``calibration.stats_memory_gb``.
Later steps are projected with the new ``Q``; what earlier steps wrote stays. Adam's moments are kept
(each step is projected with the current ``Q`` anyway).
Cost per refresh: one forward over ``refresh_samples`` sequences plus one ``n x n`` eigensolve per
distinct input.
"""

from __future__ import annotations

from torch import nn

from ...calibration.stats import current_covs
from .bases import RightProjector, input_projector


def current_projectors(
    model: nn.Module, names: list[str], batches: list[dict], options, device, budget_bytes: int | None = None
) -> dict[str, RightProjector]:
    """``{module: P_Q}`` from ``C_p`` of the model as it is now (no grad, eval mode), by ``options``' rank
    rule; layers that share an input share one projector.

    Memory: the sums of one group of inputs at a time (``budget_bytes``, as calibration's
    ``stats_memory_gb``: :func:`...calibration.stats.input_stats_passes`), and one full ``[n, n]`` ``C_p``
    at a time: each input's sum becomes its matrix, is solved and dropped before the next.
    """
    solved: dict[str, RightProjector] = {}
    for readers, cov in current_covs(model, names, batches, device, budget_bytes):
        projector = input_projector(cov, options)
        del cov
        solved.update(dict.fromkeys(readers, projector))
    return {name: solved[name] for name in names}
