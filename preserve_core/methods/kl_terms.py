"""The pieces of the ``kl`` baseline: tempered KL divergences, the top-k base cache, preserve batches.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``k`` cached classes per position.
"""

from __future__ import annotations

import torch
from torch import nn


def full_kl(student_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over real positions of ``KL(p_0^T || p^T)``, ``p^T = softmax(z / T)``. logits ``[B, T, V]``, mask ``[B, T]``."""
    log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p0 = torch.log_softmax(base_logits.float() / temperature, dim=-1)
    per_position = (log_p0.exp() * (log_p0 - log_p)).sum(-1)  # [B, T]
    return masked_mean(per_position, mask)


def topk_kl(
    student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp0: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over real positions of the KL between the base and student distributions coarsened to
    the base's top-k classes plus one tail bucket (the rest of the vocabulary)::

        sum_{j in top-k} p0_j (log p0_j - log p_j) + p0_tail (log p0_tail - log p_tail)

    ``top_ids``/``top_logp0``: ``[B, T, k]`` base top-k classes and their tempered log-probs.
    By the data-processing inequality this is a lower bound of the full KL, equal to it when the
    student matches the base.
    """
    log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_ids.long())  # [B, T, k]
    log_p0 = top_logp0.float()
    head = (log_p0.exp() * (log_p0 - log_p)).sum(-1)
    tail_p0 = (1 - log_p0.exp().sum(-1)).clamp_min(0)
    log_tail_p = torch.log1p(-log_p.exp().sum(-1).clamp(max=1 - 1e-7))
    tail = torch.where(tail_p0 > 0, tail_p0 * (torch.log(tail_p0.clamp_min(1e-30)) - log_tail_p), torch.zeros_like(tail_p0))
    return masked_mean(head + tail, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, L], lengths [N])``, right-padded with ``pad_id``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in sequences])


@torch.no_grad()
def topk_cache(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, k: int, temperature: float, batch_size: int) -> dict:
    """Base top-k tempered log-probs at every position: ``top_ids`` int32 / ``top_logp0`` float32 ``[N, L, k]``."""
    device = next(model.parameters()).device
    top_ids, top_logp = [], []
    for start in range(0, ids.shape[0], batch_size):
        chunk, n = ids[start : start + batch_size].to(device), lengths[start : start + batch_size].to(device)
        mask = (torch.arange(chunk.shape[1], device=device)[None] < n[:, None]).long()
        log_p0 = torch.log_softmax(model(input_ids=chunk, attention_mask=mask).logits.float() / temperature, dim=-1)
        values, indices = log_p0.topk(min(k, log_p0.shape[-1]), dim=-1)
        top_ids.append(indices.int().cpu())
        top_logp.append(values.cpu())
    return {"top_ids": torch.cat(top_ids), "top_logp0": torch.cat(top_logp)}


class PreserveBatches:
    """Seeded batches of preserve sequence indices; ``draws`` (batches taken so far) is the whole state.

    Batch ``d`` is position ``d mod b`` of epoch ``d div b``'s permutation (seed, epoch), sharded
    by rank like the engine's task batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.draws = 0

    def _epoch(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        mine = order[self.rank :: self.world] or order
        size = min(self.batch_size, len(mine))
        return [mine[i : i + size] for i in range(0, len(mine) - len(mine) % size, size)]

    def next(self) -> list[int]:
        per_epoch = len(self._epoch(0))
        epoch, position = divmod(self.draws, per_epoch)
        self.draws += 1
        return self._epoch(epoch)[position]
