"""``kl`` (output matching, LwF): ``lambda T^2 KL(p_0^T || p^T)`` on preserve batches.

Each micro-batch the method draws its own batch of preserve sequences (a seeded iterator over the
calibration's preserve texts, ``[bos] + text`` cut to ``data.max_length``; its position is saved in
checkpoints, so resume is exact), runs the trained model on it and adds the mean per-position KL
from the base model's tempered distribution ``p_0^T = softmax(z_0 / T)`` to the student's.

The base distribution comes from
- ``reference: frozen``: the base model itself, one extra no-grad forward per micro-batch. LoRA form:
  the same model with the adapter disabled (no extra memory). Full form: the model run with the
  pretrained target weights swapped in (``torch.func.functional_call``), which keeps one copy of the
  trained weights (the same copy l2sp/ewc keep as ``theta_0``).
- ``reference: cached`` (our interpretation of "top-k log-probs at calibration time"): the base's
  top-``calibration.kl_topk`` tempered log-probs at every position of every preserve sequence,
  computed once at calibration (extra ``kl``); the KL is taken over those classes plus one tail
  bucket (see :func:`.kl_terms.topk_kl`). No second forward; storage ``N x L x k`` (int32 + float32).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import RecipeError
from .base import PRESERVE_DATA, unwrap_model
from .forms import FormMethod, FormOptions
from .kl_terms import PreserveBatches, full_kl, pad_sequences, topk_cache, topk_kl


class KlOptions(FormOptions):
    name: Literal["kl"] = "kl"
    strength: float = Field(1.0, ge=0, description="lambda: the loss adds lambda T^2 KL(p_0^T || p^T).")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softmax(logits / T).")
    reference: Literal["frozen", "cached"] = Field(
        "frozen", description="frozen: run the base model each step; cached: top-k base log-probs from calibration."
    )
    preserve_batch_size: int = Field(8, gt=0, description="Preserve sequences per micro-batch.")
    seed: int = Field(0, description="Order of the preserve batches.")


def preserve_sequences(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    from ..calibration.batches import encode_preserve_text

    return [ids for ids in (encode_preserve_text(tokenizer, t, max_length) for t in texts) if ids]


def _pad_id(tokenizer) -> int:
    from ..calibration.batches import pad_id

    return pad_id(tokenizer)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Kl(FormMethod):
    name = "kl"
    Options = KlOptions
    needs = frozenset({PRESERVE_DATA})

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe) -> dict[str, torch.Tensor]:
        temperature = recipe.method.temperature if recipe.method.name == cls.name else 1.0
        ids, lengths = pad_sequences(preserve_sequences(preserve_texts, tokenizer, recipe.data.max_length), _pad_id(tokenizer))
        cache = topk_cache(model, ids, lengths, recipe.calibration.kl_topk, temperature, recipe.calibration.stats_batch_size)
        return {"ids": ids, "lengths": lengths, **cache, "temperature": torch.tensor(float(temperature))}

    def keeps_theta0(self) -> bool:
        return self.options.reference == "frozen"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        if self.options.reference == "cached":
            self.cache = self.ctx.calibration.extra(self.name)
            if abs(float(self.cache["temperature"]) - self.options.temperature) > 1e-6:
                raise RecipeError(
                    f"kl: the cached base log-probs are at temperature {float(self.cache['temperature'])}, the recipe asks "
                    f"{self.options.temperature}; rerun `ppft calibrate <recipe> --force`"
                )
            self.ids, self.lengths = self.cache["ids"], self.cache["lengths"]
        else:
            texts = self.ctx.calibration.preserve_texts
            sequences = preserve_sequences(texts, self.ctx.tokenizer, self.ctx.recipe.data.max_length)
            self.ids, self.lengths = pad_sequences(sequences, _pad_id(self.ctx.tokenizer))
        self.batches = PreserveBatches(len(self.lengths), self.options.preserve_batch_size, self.options.seed, *_rank_world())
        return model

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
        if self.options.form == "lora":
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
