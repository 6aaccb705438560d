"""``weightproj``: FORA with ``Q`` from the weight instead of the activations (METHODS.md, "Baselines").

``Q`` = the top right singular vectors of ``W`` (energy measured on ``S^2``), so the update avoids the
weight's dominant input directions rather than the preserve data's. Everything else (``U_1``, the
spectral channel, both forms, exports) is FORA's; no calibration is needed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .fora import Fora, ForaOptions


class WeightProjOptions(ForaOptions):
    name: Literal["weightproj"] = "weightproj"
    source: Literal["weight"] = Field("weight", description="Always weight: Q = top right singular vectors of W.")


class WeightProj(Fora):
    name = "weightproj"
    Options = WeightProjOptions
    needs = frozenset()
