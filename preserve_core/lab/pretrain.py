"""Pretraining the lab model: next-token prediction on a seeded stream of pretraining-skill examples.

Every sequence is ``<s> prompt completion </s>`` with the loss on all of it, so the model also learns
what its pretraining data look like: sampling from it at BOS (what ``ppft calibrate`` does) gives
realistic proxy data for the skills it holds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from .config import LabConfig
from .skills import PRETRAIN_SKILLS, SKILLS


def build_model(cfg: LabConfig, vocab_size: int, seed: int):
    """A randomly initialised ``LlamaForCausalLM`` of the preset's shape (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def sample_batch(rng: random.Random, tokenizer, batch_size: int, exclude: set[str]) -> dict[str, torch.Tensor]:
    """``[B, T]`` input_ids/attention_mask/labels of pretraining-skill examples, right-padded.

    Prompts in ``exclude`` (the held-out eval prompts) are redrawn, so evaluation is on unseen inputs.
    """
    rows = []
    while len(rows) < batch_size:
        ex = SKILLS[rng.choice(PRETRAIN_SKILLS)].example(rng)
        if ex["prompt"] in exclude:
            continue
        body = tokenizer.convert_tokens_to_ids(list(ex["prompt"] + ex["completion"]))
        rows.append([tokenizer.bos_token_id, *body, tokenizer.eos_token_id])
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = (ids != tokenizer.pad_token_id).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain(
    model, tokenizer, cfg: LabConfig, seed: int, device: torch.device, exclude: set[str], on_step: Callable[[int, float], None] | None = None
) -> dict:
    """AdamW with a one-cycle schedule for ``cfg.steps`` steps; returns {"final_loss", "seconds"}."""
    rng = random.Random(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    start, ema = time.perf_counter(), None
    for step in range(1, cfg.steps + 1):
        batch = {k: v.to(device) for k, v in sample_batch(rng, tokenizer, cfg.batch_size, exclude).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if on_step:
            on_step(step, ema)
    model.eval()
    return {"final_loss": ema, "seconds": time.perf_counter() - start}
