"""``replay``: a form (``full`` or ``lora``) plus the ``replay`` regulariser, preserve calibration
samples mixed into the task data at ratio ``rho`` (see :mod:`.regularizers.replay`).
"""

from __future__ import annotations

from typing import Literal

from .base import PRESERVE_DATA
from .forms import FormOptions, FormWithRegularizer
from .regularizer_options import ReplayRegularizerOptions
from .regularizers.replay import ReplayRegularizer, preserve_rows, replay_count


class ReplayOptions(FormOptions, ReplayRegularizerOptions):
    name: Literal["replay"] = "replay"


class Replay(FormWithRegularizer):
    name = "replay"
    Options = ReplayOptions
    needs = frozenset({PRESERVE_DATA})
    Regularizer = ReplayRegularizer

    def keeps_theta0(self) -> bool:
        return False


__all__ = ["Replay", "ReplayOptions", "preserve_rows", "replay_count"]
