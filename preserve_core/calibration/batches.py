"""The batches statistics are taken on: preserve texts (all tokens) and task examples (loss masks).

Batches have a fixed composition (rows sorted by length, then cut every ``batch_size``), so the
statistics do not depend on how many processes share the work.
"""

from __future__ import annotations

import torch

from ..data import IGNORE, build_train_dataset, collate


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _batched(features: list[dict], batch_size: int, pad: int) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(features, key=lambda f: len(f["input_ids"]), reverse=True)
    return [collate(ordered[i : i + batch_size], pad) for i in range(0, len(ordered), batch_size)]


def encode_preserve_text(tokenizer, text: str, max_length: int) -> list[int]:
    """``[bos] + tokens(text)``, cut to ``max_length`` (no eos: the text need not be a whole document)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]


def preserve_batches(sequences: list[list[int]], tokenizer, max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of the preserve token sequences, each cut to ``max_length``
    (``labels`` = ids; the statistics use every real token)."""
    features = [{"input_ids": ids[:max_length], "labels": ids[:max_length]} for ids in sequences if ids]
    return _batched(features, batch_size, pad_id(tokenizer))


def refresh_batches(calibration, tokenizer, max_length: int, samples: int, batch_size: int) -> list[dict]:
    """The first ``samples`` calibration preserve sequences, right-padded into batches (fixed per run): what a
    refresh measures the current model's ``C_p`` on (FORA's ``refresh_every``, FoLoRA's ``refresh_preserve``)."""
    sequences = calibration.preserve_sequences(tokenizer, max_length)[:samples]
    return preserve_batches(sequences, tokenizer, max_length, batch_size)


def task_batches(recipe, tokenizer) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The first ``calibration.max_task_examples`` training examples, tokenized exactly as for
    training (``preserve_core.data``: labels -100 outside the loss), in batches; and their count."""
    dataset, _ = build_train_dataset(recipe, tokenizer)
    limit = recipe.calibration.max_task_examples
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))
    features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]
    return _batched(features, recipe.calibration.stats_batch_size, pad_id(tokenizer)), len(features)


__all__ = ["IGNORE", "encode_preserve_text", "pad_id", "preserve_batches", "task_batches"]
