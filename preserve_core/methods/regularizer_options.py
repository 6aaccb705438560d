"""Options of the functional regularisers any method can take on top (``method.regularizers``).

Pure pydantic (no torch), so :mod:`..base` can use them in ``MethodOptions``. The baselines ``kl``,
``replay``, ``l2sp`` and ``ewc`` are ``form`` + one of these; their option classes reuse these fields.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from ..recipe_schema import Seed, StrictModel


class KlRegularizerOptions(StrictModel):
    """Output matching on preserve batches: the loss adds ``lambda T^2 KL(p_0^T || p^T)``."""

    name: Literal["kl"] = "kl"
    strength: float = Field(1.0, ge=0, description="lambda: the loss adds lambda T^2 KL(p_0^T || p^T).")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softmax(logits / T).")
    reference: Literal["frozen", "cached"] = Field(
        "frozen", description="frozen: run the base model each step; cached: top-k base log-probs from calibration."
    )
    preserve_batch_size: int = Field(8, gt=0, description="Preserve sequences per micro-batch.")
    seed: Seed = Field(0, description="Order of the preserve batches.")


class ReplayRegularizerOptions(StrictModel):
    """Preserve samples mixed into the task data at ratio ``rho``."""

    name: Literal["replay"] = "replay"
    rho: float = Field(0.25, ge=0, lt=1, description="Fraction of the training rows that are preserve samples.")
    seed: Seed = Field(0, description="Order in which preserve texts are taken (and cycled).")


class L2spRegularizerOptions(StrictModel):
    """A pull towards the pretrained weights, ``(alpha/2) ||dW||^2``."""

    name: Literal["l2sp"] = "l2sp"
    strength: float = Field(0.01, ge=0, description="alpha: the penalty is (alpha / 2) ||theta - theta_0||^2.")


class EwcRegularizerOptions(StrictModel):
    """Elastic weight consolidation, ``(lambda/2) sum_i F_i dW_i^2`` with the preserve Fisher ``F``."""

    name: Literal["ewc"] = "ewc"
    strength: float = Field(1.0, ge=0, description="lambda: the penalty is (lambda / 2) sum_i F_i (theta_i - theta_0,i)^2.")


class LeakRegularizerOptions(StrictModel):
    """Each layer's output change on the preserve inputs, ``(lambda/N) sum ||dW L||^2 / ||W_0 L||^2`` (``L L^T = C_p``)."""

    name: Literal["leak"] = "leak"
    strength: float = Field(
        1000.0, ge=0,
        description="lambda: the loss adds lambda times the mean over layers of E||dW x||^2 / E||W_0 x||^2 on the "
        "preserve inputs (1000: best on the lab with FORA's LoRA form, docs/methods/ablations.md section 12).",
    )


REGULARIZER_OPTIONS = {
    cls.model_fields["name"].default: cls
    for cls in (
        KlRegularizerOptions, ReplayRegularizerOptions, L2spRegularizerOptions, EwcRegularizerOptions,
        LeakRegularizerOptions,
    )  # fmt: skip
}

RegularizerConfig = Annotated[Union[tuple(REGULARIZER_OPTIONS.values())], Field(discriminator="name")]  # noqa: UP007
