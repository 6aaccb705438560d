"""``full``: plain full fine-tuning of the target modules with AdamW (the unprotected baseline)."""

from __future__ import annotations

from typing import Literal

from .base import MethodOptions
from .forms import FormMethod, unfreeze_targets


class FullOptions(MethodOptions):
    name: Literal["full"] = "full"


class FullFineTune(FormMethod):
    """The target linears train (``form: full``); keeps no copy of ``W_0`` unless a regulariser asks."""

    name = "full"
    Options = FullOptions

    def keeps_theta0(self) -> bool:
        return False


__all__ = ["FullFineTune", "FullOptions", "unfreeze_targets"]
