"""``pissa``: LoRA initialised from the top ``r`` singular triplets of ``W`` (PEFT's ``init_lora_weights="pissa"``),
the base keeping the residual; exported as a plain rank-``2r`` LoRA of the original base (:mod:`.residual_lora`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .lora import LoraOptions
from .residual_lora import ResidualLora


class PissaOptions(LoraOptions):
    name: Literal["pissa"] = "pissa"
    svd_niter: int = Field(0, ge=0, description="0: exact SVD; N: PEFT's randomized SVD with N subspace iterations (pissa_niter_N).")


class Pissa(ResidualLora):
    name = "pissa"
    Options = PissaOptions

    def peft_init(self, model) -> dict:
        return {"init_lora_weights": f"pissa_niter_{self.options.svd_niter}" if self.options.svd_niter else "pissa"}
