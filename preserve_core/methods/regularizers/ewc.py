"""``ewc`` regulariser: elastic weight consolidation, ``(lambda/2) sum_i F_i (theta_i - theta_0,i)^2``.

``F`` is the diagonal of the *true* Fisher of the pretrained model on the preserve data, estimated
at calibration time (:func:`diagonal_fisher`) and cached as the calibration extra ``ewc``. Estimated
quantity, per parameter entry ``i``, with ``N`` the preserve tokens used::

    F_i = (1/N) sum_sequences ( d/dtheta_i  sum_t log p_theta0(y_t | x_<=t) )^2,   y_t ~ p_theta0(. | x_<=t)

one label per position, sampled from the model itself (not the data's next token), per-sequence
gradients (one backward per sequence). Labels at different positions are drawn independently and
the score has zero mean, so the cross terms vanish in expectation: this is an unbiased estimate of
the per-token average Fisher ``(1/N) sum_t E_y[(d log p(y_t))^2]``. With that normalisation
``(1/2) dtheta^T F dtheta`` approximates the mean per-token KL(p_0 || p) on preserve data, so
``lambda = 1`` weighs forgetting like the (mean per-token) task loss.

On a method other than full fine-tuning the penalty is on its effective weight change ``dW``
(``method.weight_deltas()``: ``s B A`` for LoRA, FORA's and FoLoRA's update) with the Fisher of ``W``,
forming each ``m x n`` ``dW`` once per step.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PPFTError
from ...models import resolve_target_modules
from ...sharding import like, local, sum_over_shards
from ..base import PRESERVE_DATA
from .base import Regularizer
from ..regularizer_options import EwcRegularizerOptions


def fisher_parameter_names(model: nn.Module, recipe) -> list[str]:
    """Every parameter ``form: full`` would train: the target linears' (and, with
    ``model.train_embeddings``, the embeddings')."""
    names = []
    for module in resolve_target_modules(model, recipe.model.target_modules):
        names += [f"{module}.{n}" for n, _ in model.get_submodule(module).named_parameters()]
    if recipe.model.train_embeddings:
        wanted = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
        names += [n for n, p in model.named_parameters() if id(p) in wanted and n not in names]
    return names


def diagonal_fisher(model: nn.Module, names: list[str], sequences: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    """``{name: F}`` (float32, each the shape of its parameter): the per-token true Fisher diagonal
    (module docstring) over ``sequences`` (token id lists, every position predicts a sampled label)."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    flags = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    try:
        return _accumulate_fisher(model, names, chosen, sequences, seed)
    finally:
        for p, flag in zip(chosen, flags, strict=True):
            p.requires_grad_(flag)


def _accumulate_fisher(model, names, chosen, sequences, seed) -> dict[str, torch.Tensor]:
    device = chosen[0].device
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    for ids in sequences:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()  # [T, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        labels = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)  # [T, 1]
        grads = torch.autograd.grad(log_probs.gather(1, labels).sum(), chosen, allow_unused=True)
        for f, g in zip(fisher, grads, strict=True):
            if g is not None:
                f += g.float() ** 2
        tokens += len(ids)
    return {n: f / max(tokens, 1) for n, f in zip(names, fisher, strict=True)}


class EwcRegularizer(Regularizer):
    name = "ewc"
    Options = EwcRegularizerOptions
    needs = frozenset({PRESERVE_DATA})

    @classmethod
    def has_calibration_extra(cls, options) -> bool:
        return True

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe, options) -> dict[str, torch.Tensor]:
        from ...calibration.batches import encode_preserve_text

        cfg = recipe.calibration
        sequences = [encode_preserve_text(tokenizer, t, recipe.data.max_length) for t in preserve_texts[: cfg.fisher_samples]]
        sequences = [ids for ids in sequences if ids]
        with torch.enable_grad():
            return diagonal_fisher(model, fisher_parameter_names(model, recipe), sequences, cfg.seed)

    def attach(self, model: nn.Module, method) -> None:
        method.track_weight_deltas()
        self.method = method
        cached = self.ctx.calibration.extra(self.name)
        missing = [n for n in method.delta_names() if n not in cached]
        if missing:
            raise PPFTError(
                f"ewc: the cached Fisher lacks {missing[:3]} (targets or model.train_embeddings changed?); "
                "rerun `ppft calibrate <recipe> --force`"
            )
        self.fisher = {n: cached[n].to(self.ctx.device) for n in method.delta_names()}

    def penalty(self) -> torch.Tensor:
        """``(lambda/2) sum F dtheta^2`` (a scalar with grad)."""
        total = sum((local(self.fisher[n]) * d.float() ** 2).sum() for n, d in self.method.weight_deltas().items())
        return 0.5 * self.options.strength * sum_over_shards(total, getattr(self.method, "row_sharded_deltas", False))

    def on_sharded(self, model: nn.Module, method) -> None:
        """Row-sharded deltas (``form: full`` under FSDP): ``F`` is split by rows like its parameter."""
        if getattr(method, "row_sharded_deltas", False):
            self.fisher = {n: like(f, method.trained[n]) for n, f in self.fisher.items()}

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return self.penalty() if self.options.strength > 0 else None
