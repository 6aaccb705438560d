"""Log-likelihood scoring and per-token KL, batched over right-padded sequences.

For a sequence ``x_0 .. x_{L-1}`` the model's logits at position ``t`` give the next-token
distribution ``p(. | x_{<=t})``; the log-probability of token ``x_t`` is read at ``t - 1``.
Log-softmax is taken one row at a time over the positions needed, so memory stays O(T * V).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T])``, padding on the right to the longest row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def length_batches(sequences: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def model_logits(model) -> Logits:
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return run


def base_logits(model, base_model) -> Logits:
    """The base model's logits: ``base_model`` if given, else ``model`` with its PEFT adapter disabled."""
    if base_model is not None:
        return model_logits(base_model)
    if not hasattr(model, "disable_adapter"):
        from ..errors import RecipeError

        raise RecipeError("kl_to_base needs the base model: pass base_model= (full fine-tuning) or a PEFT model")

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return run


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def token_logprobs(model, items: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> list[torch.Tensor]:
    """For each ``(ids, start)``: ``log p(ids[t] | ids[:t])`` for ``t`` in ``[start, len(ids))``, a float32 [L - start]."""
    sequences = [ids for ids, _ in items]
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    device = _device(model)
    for batch in length_batches(sequences, batch_size):
        ids, mask = right_pad([sequences[i] for i in batch], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(batch):
            seq, start = items[i]
            start = max(start, 1)
            if start >= len(seq):
                out[i] = torch.zeros(0)
                continue
            logp = logits[row, start - 1 : len(seq) - 1].float().log_softmax(-1)
            targets = ids[row, start : len(seq)].to(logp.device)
            out[i] = logp.gather(-1, targets[:, None])[:, 0].cpu()
    return out


@torch.inference_mode()
def kl_per_token(
    tuned: Logits, base: Logits, sequences: list[list[int]], batch_size: int, pad_id: int, device
) -> list[torch.Tensor]:
    """For each sequence, ``KL(p_base || p_tuned)`` at every position: ``sum_v p_b(v) (log p_b(v) - log p_t(v))``, float32 [L]."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    for batch in length_batches(sequences, batch_size):
        ids, mask = right_pad([sequences[i] for i in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        tuned_logits, base_logits_ = tuned(ids, mask), base(ids, mask)
        for row, i in enumerate(batch):
            n = len(sequences[i])
            log_t = tuned_logits[row, :n].float().log_softmax(-1)
            log_b = base_logits_[row, :n].float().log_softmax(-1)
            out[i] = (log_b.exp() * (log_b - log_t)).sum(-1).clamp_min(0.0).cpu()
    return out


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block and restore its previous mode (the engine calls mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
