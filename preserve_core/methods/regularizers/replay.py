"""``replay`` regulariser: mix preserve calibration samples into the task data at ratio ``rho``.

Our interpretation of "ratio": a fraction of the *data*. With ``n`` task rows, ``round(n rho / (1 - rho))``
preserve rows are appended (the preserve texts in a seeded order, cycled when more are needed), so a
fraction ``rho`` of all rows is replay. The engine draws each batch uniformly without replacement from
a seeded permutation, so every batch holds ``rho`` of its rows *in expectation* (hypergeometric spread)
and one epoch holds exactly the appended count. Preserve rows are plain text ``[bos] + text`` (no eos:
sampled texts are cut, not finished) cut to ``data.max_length``, with loss on every token.
"""

from __future__ import annotations

import torch

from ...data import encode_text
from ..base import PRESERVE_DATA
from .base import Regularizer
from ..regularizer_options import ReplayRegularizerOptions


def replay_count(n_task: int, rho: float) -> int:
    """Preserve rows to add so that they are a fraction ``rho`` of ``n_task + count`` rows."""
    return round(n_task * rho / (1 - rho))


def preserve_rows(texts: list[str], tokenizer, max_length: int, count: int, seed: int) -> dict[str, list]:
    """``count`` tokenized preserve rows (``input_ids`` = ``labels``), texts in a seeded order, cycled."""
    encoded = [encode_text(tokenizer, t, append_eos=False)[0][:max_length] for t in texts]
    encoded = [ids for ids in encoded if len(ids) > 1]
    if not encoded and count:
        raise ValueError("replay: no preserve text has a token to learn from")
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist() if encoded else []
    picked = [encoded[order[i % len(order)]] for i in range(count)]
    return {"input_ids": picked, "labels": [list(ids) for ids in picked]}


class ReplayRegularizer(Regularizer):
    name = "replay"
    Options = ReplayRegularizerOptions
    needs = frozenset({PRESERVE_DATA})

    def training_data(self, dataset):
        import datasets

        count = replay_count(len(dataset), self.options.rho)
        if count == 0:
            return dataset
        texts = self.ctx.calibration.preserve_texts
        rows = preserve_rows(texts, self.ctx.tokenizer, self.ctx.recipe.data.max_length, count, self.options.seed)
        replay = datasets.Dataset.from_dict(rows, features=dataset.features)
        return datasets.concatenate_datasets([dataset, replay])
