"""Preserve (pretraining-proxy) data drawn from the model itself.

Samples are made in fixed global batches: batch ``j`` holds sample slots ``j*b .. j*b+b-1`` and is
generated under the seed ``(seed, j)``, whatever the number of processes; rank r generates the
batches with ``j % world == r`` and the texts are gathered in batch order. So the same recipe gives
the same texts on 1 or N processes (same device kind), and a different ``seed`` gives other texts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PPFTError, RecipeError
from ..evaluation.generation import left_pad
from ..recipe_schema import CalibrationConfig
from .dist import Dist

MAX_ATTEMPT_FACTOR = 4  # stop after num_samples * this many draws, however many were dropped


@dataclass
class Sample:
    """One sample: its text, its exact token ids (BOS + start + new tokens) and how many are new."""

    text: str
    ids: list[int]
    n_new: int

    @property
    def new_ids(self) -> list[int]:
        return self.ids[len(self.ids) - self.n_new :]


@dataclass
class SamplingReport:
    """What sampling did: draws made, samples kept, drops by reason."""

    attempted: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "short": 0, "repetitive": 0})


def degenerate_reason(new_ids: list[int], text: str, min_new_tokens: int, max_repeat_fraction: float) -> str | None:
    """Why a sample is dropped, or None to keep it.

    new_ids: the generated tokens before eos. ``empty``: no visible text; ``short``: fewer than
    ``min_new_tokens`` new tokens; ``repetitive``: the most frequent new token makes up more than
    ``max_repeat_fraction`` of them.
    """
    if not text.strip():
        return "empty"
    if len(new_ids) < min_new_tokens:
        return "short"
    if new_ids and Counter(new_ids).most_common(1)[0][1] / len(new_ids) > max_repeat_fraction:
        return "repetitive"
    return None


def prefix_ids(tokenizer, start: str) -> list[int]:
    """BOS (EOS for tokenizers without one, e.g. GPT-2/Qwen-style document separators)."""
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    if start == "bos":
        if tokenizer.eos_token_id is None:
            raise RecipeError("calibration.start: bos needs a tokenizer with a BOS or EOS token; use start: prompts")
        return [tokenizer.eos_token_id]
    return []


def start_sequences(tokenizer, cfg: CalibrationConfig, batch_index: int, size: int, vocab_size: int) -> list[list[int]]:
    """The token ids each sample of batch ``batch_index`` starts from.

    bos: ``[bos]``; prompts: ``[bos] + prompt`` cycling through ``seed_prompts`` by sample slot;
    uniform: ``[bos, u]`` with ``u`` uniform over the non-special vocabulary, drawn from a
    generator seeded by ``(seed, batch_index)``.
    """
    head = prefix_ids(tokenizer, cfg.start)
    first = batch_index * size
    if cfg.start == "bos":
        return [list(head) for _ in range(size)]
    if cfg.start == "prompts":
        prompts = [head + tokenizer(p, add_special_tokens=False)["input_ids"] for p in cfg.seed_prompts]
        if not all(prompts):
            raise RecipeError("calibration.seed_prompts: a prompt is empty after tokenization and there is no BOS")
        return [prompts[(first + i) % len(prompts)] for i in range(size)]
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([t for t in range(vocab_size) if t not in special])
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, batch_index) + 1)
    picks = allowed[torch.randint(len(allowed), (size,), generator=gen)]
    return [head + [int(t)] for t in picks]


def batch_seed(seed: int, batch_index: int) -> int:
    """A distinct 63-bit seed per (recipe seed, batch)."""
    return (seed * 1_000_003 + batch_index * 7_919 + 12_345) % (2**63 - 1)


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a sample: the tokenizer's EOS and the model's generation EOS id(s)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_config(model: nn.Module, tokenizer, cfg: CalibrationConfig):
    """Pure temperature / top-p sampling with the KV cache (top-k off; the model's own defaults ignored)."""
    from transformers import GenerationConfig

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos or None,
        use_cache=True,
    )


def cut_at_eos(row: list[int], eos: list[int]) -> list[int]:
    """The tokens before the first eos (all of them when there is none)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


def generate_batch(model: nn.Module, tokenizer, cfg: CalibrationConfig, batch_index: int, size: int) -> list[Sample]:
    """The samples of global batch ``batch_index``.

    One ``model.generate`` call on the left-padded start sequences [size, T0] with their attention
    mask, under ``torch.manual_seed(batch_seed(seed, batch_index))`` (the caller's RNG state is
    restored afterwards). A sample's ids are its start plus the new tokens before eos; its text is
    the decoded ids after BOS.
    """
    gen_cfg = generation_config(model, tokenizer, cfg)
    starts = start_sequences(tokenizer, cfg, batch_index, size, int(model.config.vocab_size))
    ids, mask = left_pad(starts, gen_cfg.pad_token_id)
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(batch_seed(cfg.seed, batch_index))
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
    head = len(prefix_ids(tokenizer, cfg.start))
    eos = eos_ids(model, tokenizer)
    samples = []
    for start, row in zip(starts, out[:, ids.shape[1] :].tolist(), strict=True):
        new = cut_at_eos(row, eos)
        samples.append(Sample(tokenizer.decode(start[head:] + new, skip_special_tokens=True), start + new, len(new)))
    return samples


def sample_preserve_texts(model: nn.Module, tokenizer, cfg: CalibrationConfig, dist: Dist | None = None) -> tuple[list[Sample], SamplingReport]:
    """``cfg.num_samples`` samples that pass the degenerate filter, in batch order (fewer, with a
    report, if the filter rejects too much: at most ``num_samples * MAX_ATTEMPT_FACTOR`` draws)."""
    dist = dist or Dist()
    size = min(cfg.batch_size, cfg.num_samples)
    kept: list[Sample] = []
    report = SamplingReport()
    next_batch = 0
    while len(kept) < cfg.num_samples and report.attempted < cfg.num_samples * MAX_ATTEMPT_FACTOR:
        n_batches = -(-(cfg.num_samples - len(kept)) // size)
        batches = range(next_batch, next_batch + n_batches)
        next_batch += n_batches
        mine = [(j, generate_batch(model, tokenizer, cfg, j, size)) for j in batches if dist.mine(j)]
        drawn = [s for _, samples in sorted(dist.gather(mine), key=lambda item: item[0]) for s in samples]
        for sample in drawn:
            if len(kept) == cfg.num_samples:
                break  # surplus draws of the last round are not examined
            report.attempted += 1
            reason = degenerate_reason(sample.new_ids, sample.text, cfg.min_new_tokens, cfg.max_repeat_fraction)
            if reason:
                report.dropped[reason] += 1
            else:
                kept.append(sample)
    report.kept = len(kept)
    if not kept:
        raise PPFTError(
            f"model sampling gave no usable sample in {report.attempted} draws (dropped: {report.dropped}). "
            "Lower calibration.min_new_tokens, raise calibration.max_repeat_fraction, or use preserve_source: dataset."
        )
    return kept, report
