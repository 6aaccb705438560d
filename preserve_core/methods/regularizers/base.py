"""The interface of a functional regulariser, the piece any method can take on top.

The engine builds the method, prepares the model, then attaches each regulariser of
``method.regularizers`` in order and calls, besides the method's own hooks::

    reg.attach(model, method)               # after method.prepare_model: caches, snapshots, batches
    dataset = reg.training_data(dataset)    # after method.training_data (replay appends rows)
    loss += reg.extra_loss(model, batch, outputs)   # after method.extra_loss, per micro-batch
    reg.state_dict() / reg.load_state_dict()        # in checkpoints, beside the method's state

``needs`` (calibration artifacts) join the method's; ``calibrate_extra`` adds cached tensors under
the regulariser's name (``extras/<name>.safetensors``), like a method's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class Regularizer:
    name: ClassVar[str]
    Options: ClassVar[type]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options, ctx):
        self.options = options
        self.ctx = ctx

    @classmethod
    def needs_for(cls, options) -> frozenset[str]:
        return cls.needs

    @classmethod
    def has_calibration_extra(cls, options) -> bool:
        return False

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe, options) -> dict[str, torch.Tensor]:
        return {}

    def attach(self, model: nn.Module, method: Any) -> None:
        return None

    def on_sharded(self, model: nn.Module, method: Any) -> None:
        """After FSDP sharded the model: split kept full-size tensors like the parameters they pair with."""
        return None

    def training_data(self, dataset):
        return dataset

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None
