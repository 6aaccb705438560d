"""FORA full form: re-estimating ``Q`` on the current model's activations (``refresh_every``; ours).

The spec fixes ``Q`` from the base model's ``C_p``. But every layer's update moves the preserve inputs
of the layers after it, so a fixed ``Q`` stops spanning them (the compounding leak measured in
docs/methods/fora.md). Every ``refresh_every`` optimizer steps the first ``refresh_samples``
calibration preserve sequences run through the model being trained (no grad, eval mode); each
target input's ``C_p`` is measured again on these current activations and ``Q`` recomputed with the
same ``energy`` / ``rank`` / ``max_rank``. Later steps are projected with the new ``Q``; what earlier
steps wrote stays. Adam's moments are kept (each step is projected with the current ``Q`` anyway).
Cost per refresh: one forward over ``refresh_samples`` sequences plus one ``n x n`` eigensolve per
distinct input.
"""

from __future__ import annotations

import torch
from torch import nn

from ...calibration.batches import preserve_batches
from ...calibration.stats import collect_input_stats
from .bases import RightProjector, input_projector


def current_preserve_covs(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """``{module: C_p [n, n]}`` of the model as it is now (layers sharing an input share the tensor)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stats = collect_input_stats(model, names, batches, positions="all")
    finally:
        model.train(was_training)
    return {name: cov for name, (cov, _) in stats.items()}


def refreshed_projectors(covs: dict[str, torch.Tensor], options, device) -> dict[str, RightProjector]:
    """``{module: P_Q}`` from each ``C_p`` by ``options``' rank rule (one object per distinct input)."""
    solved: dict[int, RightProjector] = {}
    for cov in covs.values():
        if id(cov) not in solved:
            solved[id(cov)] = input_projector(cov.to(device), options)
    return {name: solved[id(cov)] for name, cov in covs.items()}


def refresh_batches(calibration, tokenizer, max_length: int, samples: int, batch_size: int) -> list[dict]:
    """The first ``samples`` calibration preserve sequences, right-padded into batches (fixed per run)."""
    sequences = calibration.preserve_sequences(tokenizer, max_length)[:samples]
    return preserve_batches(sequences, tokenizer, max_length, batch_size)
