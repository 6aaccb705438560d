"""``kl`` regulariser (output matching, LwF): ``lambda T^2 KL(p_0^T || p^T)`` on preserve batches.

Each micro-batch it draws its own batch of preserve sequences (a seeded iterator over the
calibration's preserve texts, ``[bos] + text`` cut to ``data.max_length``; its position is saved in
checkpoints, so resume is exact), runs the trained model on it and adds the mean per-position KL
from the base model's tempered distribution ``p_0^T = softmax(z_0 / T)`` to the student's.

The base distribution comes from
- ``reference: frozen``: the base model itself, one extra no-grad forward per micro-batch. A model
  with PEFT's ``disable_adapter()`` (LoRA, FoLoRA) runs with the adapter off (no extra memory);
  any other (full FT, FORA's forms) runs with the trainable parameters swapped back to their values
  at the start of training (``torch.func.functional_call``). Every method's initial update is zero
  (``B = 0``, ``delta = 0``, ``W = W_0``), so that is the base model; it keeps one copy of the
  trainable parameters (the method's ``theta0`` when it already has one).
- ``reference: cached``: the base's top-``calibration.kl_topk`` tempered log-probs at every position
  of every preserve sequence, computed once at calibration (extra ``kl``); the KL is taken over
  those classes plus one tail bucket (see :func:`..kl_terms.topk_kl`). No second forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import RecipeError
from ..base import PRESERVE_DATA, unwrap_model
from ..kl_terms import PreserveBatches, full_kl, pad_sequences, topk_cache, topk_kl
from .base import Regularizer
from ..regularizer_options import KlRegularizerOptions


def preserve_sequences(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    from ...calibration.batches import encode_preserve_text

    return [ids for ids in (encode_preserve_text(tokenizer, t, max_length) for t in texts) if ids]


def _pad_id(tokenizer) -> int:
    from ...calibration.batches import pad_id

    return pad_id(tokenizer)


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def trainable_snapshot(model: nn.Module, method) -> dict[str, torch.Tensor]:
    """The trainable parameters' current values (the method's ``theta0`` when it keeps one)."""
    theta0 = getattr(method, "theta0", None)
    if theta0:
        return theta0
    return {n: p.detach().clone() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


class KlRegularizer(Regularizer):
    name = "kl"
    Options = KlRegularizerOptions
    needs = frozenset({PRESERVE_DATA})

    @classmethod
    def has_calibration_extra(cls, options) -> bool:
        return options.reference == "cached"

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe, options) -> dict[str, torch.Tensor]:
        sequences = preserve_sequences(preserve_texts, tokenizer, recipe.data.max_length)
        ids, lengths = pad_sequences(sequences, _pad_id(tokenizer))
        cache = topk_cache(model, ids, lengths, recipe.calibration.kl_topk, options.temperature, recipe.calibration.stats_batch_size)
        return {"ids": ids, "lengths": lengths, **cache, "temperature": torch.tensor(float(options.temperature))}

    def attach(self, model: nn.Module, method) -> None:
        if self.options.reference == "cached":
            self.cache = self.ctx.calibration.extra(self.name)
            if abs(float(self.cache["temperature"]) - self.options.temperature) > 1e-6:
                raise RecipeError(
                    f"kl: the cached base log-probs are at temperature {float(self.cache['temperature'])}, the recipe asks "
                    f"{self.options.temperature}; rerun `ppft calibrate <recipe> --force`"
                )
            self.ids, self.lengths = self.cache["ids"], self.cache["lengths"]
        else:
            sequences = preserve_sequences(self.ctx.calibration.preserve_texts, self.ctx.tokenizer, self.ctx.recipe.data.max_length)
            self.ids, self.lengths = pad_sequences(sequences, _pad_id(self.ctx.tokenizer))
            if not hasattr(unwrap_model(model), "disable_adapter"):
                self.theta0 = trainable_snapshot(model, method)
        self.batches = PreserveBatches(len(self.lengths), self.options.preserve_batch_size, self.options.seed, *rank_world())

    def preserve_batch(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """``(indices, input_ids [B, L], attention_mask [B, L])`` of the next preserve batch, on device."""
        index = self.batches.next()
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.ids[index, :width].to(self.ctx.device)
        mask = (torch.arange(width)[None] < lengths[:, None]).long().to(self.ctx.device)
        return index, ids, mask

    @torch.no_grad()
    def base_logits(self, net: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if hasattr(net, "disable_adapter"):
            with net.disable_adapter():
                return net(input_ids=ids, attention_mask=mask).logits
        return torch.func.functional_call(net, self.theta0, (), {"input_ids": ids, "attention_mask": mask}).logits

    def divergence(self, model: nn.Module) -> torch.Tensor:
        """Mean per-position ``KL(p_0^T || p^T)`` on the next preserve batch (with grad through the student)."""
        net = unwrap_model(model)
        index, ids, mask = self.preserve_batch()
        temperature = self.options.temperature
        if self.options.reference == "cached":
            width = ids.shape[1]
            top_ids = self.cache["top_ids"][index, :width].to(self.ctx.device)
            top_logp0 = self.cache["top_logp0"][index, :width].to(self.ctx.device)
            return topk_kl(net(input_ids=ids, attention_mask=mask).logits, top_ids, top_logp0, mask, temperature)
        base = self.base_logits(net, ids, mask)
        return full_kl(net(input_ids=ids, attention_mask=mask).logits, base, mask, temperature)

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        if self.options.strength == 0:
            return None
        return self.options.strength * self.options.temperature**2 * self.divergence(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"preserve_draws": torch.tensor(self.batches.draws)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.batches.draws = int(state["preserve_draws"])
