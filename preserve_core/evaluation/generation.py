"""Batched greedy generation: left padding, attention mask, KV cache, early stop on eos or stop strings.

Prompts are sorted by length (longest first) so a batch wastes little compute on padding; the
results come back in the caller's order. Left padding keeps every prompt's last token in the
last column, so the first generated token of every row is predicted at the same position, and
``generate`` derives position ids from the attention mask.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..data import pad_id_of


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T])``, padding on the left to the longest row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains a stop string.

    Only the last ``window`` tokens are decoded each step (enough to hold any stop string), so the
    check costs O(B * window) per step. It only ends generation early; the text is cut afterwards
    by :func:`cut_at_stop` on the full decoded output, so a missed early stop cannot change a result.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_width = prompt_width
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 2
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            start = max(self.prompt_width, input_ids.shape[1] - self.window)
            tails = input_ids[:, start:].tolist()
            for row, tail in enumerate(tails):
                if not self.done[row]:
                    text = self.tokenizer.decode(tail, skip_special_tokens=True)
                    self.done[row] = any(s in text for s in self.stops)
        return self.done.clone()


def eos_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id the tokenizer or the model's generation config names."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return sorted(ids)


def _strip_after_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[str]) -> list[str]:
    """Greedy continuations of one batch of token-id prompts, decoded and cut at the stop strings."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)  # masked on the left; after an EOS, cut by _strip_after_eos
    eos = eos_ids(model, tokenizer)
    input_ids, mask = left_pad(prompts, pad_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=pad_id, eos_token_id=eos or None,
    )  # fmt: skip
    criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stops, input_ids.shape[1])])
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        stopping_criteria=criteria,
    )
    new_tokens = out[:, input_ids.shape[1] :].tolist()
    texts = [tokenizer.decode(_strip_after_eos(row, set(eos)), skip_special_tokens=True) for row in new_tokens]
    return [cut_at_stop(text, stops) for text in texts]


def greedy_generate(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[str], batch_size: int
) -> list[str]:
    """Greedy continuations of every prompt, batched by similar length; returned in input order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, stops)
        for i, text in zip(chunk, texts, strict=True):
            results[i] = text
    return results
