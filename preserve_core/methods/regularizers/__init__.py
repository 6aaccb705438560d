"""Functional regularisers any method takes on top (``method.regularizers``): the registry and the
collection the engine drives. Adding one is a module here and one line in ``REGULARIZERS``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Regularizer
from .ewc import EwcRegularizer
from .kl import KlRegularizer
from .l2sp import L2spRegularizer
from .leak import LeakRegularizer
from ..regularizer_options import REGULARIZER_OPTIONS, RegularizerConfig
from .replay import ReplayRegularizer

REGULARIZERS: dict[str, type[Regularizer]] = {
    "kl": KlRegularizer,
    "replay": ReplayRegularizer,
    "l2sp": L2spRegularizer,
    "ewc": EwcRegularizer,
    "leak": LeakRegularizer,
}
assert set(REGULARIZERS) == set(REGULARIZER_OPTIONS)

# Regularisers that read the method's weight change (``Method.weight_deltas``).
READS_WEIGHT_DELTAS = frozenset({"l2sp", "ewc", "leak"})


def regularizer_needs(configs: list) -> frozenset[str]:
    """The calibration artifacts the listed regularisers read (their union)."""
    needs: frozenset[str] = frozenset()
    for options in configs:
        needs |= REGULARIZERS[options.name].needs_for(options)
    return needs


class Regularizers:
    """The regularisers of one run, in recipe order; the engine calls these after the method's own hooks."""

    def __init__(self, configs: list, ctx):
        self.items = [REGULARIZERS[options.name](options, ctx) for options in configs]

    def __len__(self) -> int:
        return len(self.items)

    def attach(self, model: nn.Module, method) -> None:
        for reg in self.items:
            reg.attach(model, method)

    def training_data(self, dataset):
        for reg in self.items:
            dataset = reg.training_data(dataset)
        return dataset

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        """The sum of the regularisers' loss terms (None when none adds one)."""
        total = None
        for reg in self.items:
            extra = reg.extra_loss(model, batch, outputs)
            if extra is not None:
                total = extra if total is None else total + extra
        return total

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every regulariser's state under ``<name>/<key>``."""
        return {f"{reg.name}/{k}": v for reg in self.items for k, v in reg.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for reg in self.items:
            prefix = f"{reg.name}/"
            reg.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


__all__ = ["READS_WEIGHT_DELTAS", "REGULARIZERS", "Regularizer", "RegularizerConfig", "Regularizers", "regularizer_needs"]
