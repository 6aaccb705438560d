"""One function per task kind: ``(model, tokenizer, task, batch_size, base_model) -> TaskResult``."""

from __future__ import annotations

import math
import re
import string
import time

import torch

from ..data import encode_prompt_completion, encode_text, pad_id_of
from ..errors import RecipeError
from ..recipe_schema import EvalTask
from ..report import TaskResult, binomial_stderr
from .generation import greedy_generate
from .rows import cached_encoding, encode_plain, encode_prompt, load_task_rows, require_columns
from .scoring import base_logits, kl_per_token, model_logits, token_logprobs

MAX_SAMPLES = 20  # examples kept in a result for the report


def normalize_text(text: str, steps: list[str]) -> str:
    """Apply the task's normalisation steps in order (strip, lower, collapse_whitespace, strip_punctuation)."""
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "lower":
            text = text.lower()
        elif step == "collapse_whitespace":
            text = re.sub(r"\s+", " ", text).strip()
        elif step == "strip_punctuation":
            text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def model_max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------------------------
def _encode_exact_match(task: EvalTask, tokenizer) -> tuple[list[str], list[list[int]], list[str]]:
    rows = load_task_rows(task)
    require_columns(task, rows, "prompt", "completion")
    prompts = [r["prompt"] for r in rows]
    return prompts, [encode_prompt(tokenizer, p) for p in prompts], [r["completion"] for r in rows]


def run_exact_match(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    """Greedy generation (``max_new_tokens``, cut at ``stop``), normalised, compared with the completion.

    score = (1/n) sum_i [norm(gen_i) == norm(completion_i)], stderr = sqrt(p (1 - p) / n).
    """
    prompts, prompt_ids, references = cached_encoding(
        task, tokenizer, "exact_match", lambda: _encode_exact_match(task, tokenizer)
    )
    limit = model_max_length(model)
    if limit:
        keep = max(limit - task.max_new_tokens, 1)
        prompt_ids = [ids[-keep:] for ids in prompt_ids]
    predictions = greedy_generate(model, tokenizer, prompt_ids, task.max_new_tokens, task.stop, batch_size)
    correct = [
        normalize_text(p, task.normalize) == normalize_text(r, task.normalize) for p, r in zip(predictions, references)
    ]
    score = sum(correct) / len(correct)
    samples = [
        {"prompt": q, "prediction": p, "reference": r, "correct": c}
        for q, p, r, c in list(zip(prompts, predictions, references, correct))[:MAX_SAMPLES]
    ]
    return TaskResult(
        task.name, task.kind, "exact_match", score, len(correct), binomial_stderr(score, len(correct)), samples=samples
    )


# ---------------------------------------------------------------------------------------------
# multiple_choice
# ---------------------------------------------------------------------------------------------
def _encode_multiple_choice(
    task: EvalTask, tokenizer
) -> tuple[list[tuple[list[int], int]], list[tuple[int, int]], list[int], list[int]]:
    """Flattened ``(prompt + choice ids, start of choice)`` items, each row's item span, answers, choice lengths."""
    rows = load_task_rows(task)
    require_columns(task, rows, "prompt", "choices", "answer")
    items, spans, answers, char_lengths = [], [], [], []
    for i, row in enumerate(rows):
        if not row["choices"] or not 0 <= int(row["answer"]) < len(row["choices"]):
            raise RecipeError(
                f"eval task '{task.name}': row {i} needs non-empty choices and 0 <= answer < len(choices)"
            )
        head = encode_prompt(tokenizer, row["prompt"])
        spans.append((len(items), len(items) + len(row["choices"])))
        for choice in row["choices"]:
            items.append((head + encode_plain(tokenizer, choice), len(head)))
            char_lengths.append(max(len(choice), 1))
        answers.append(int(row["answer"]))
    return items, spans, answers, char_lengths


def run_multiple_choice(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    """Pick the choice with the highest ``log p(choice | [bos] + prompt)``.

    acc: argmax_c sum_t log p(c_t | ...); acc_norm: argmax_c of that sum divided by len(c) in characters
    (as lm-eval). Choices are appended to the prompt as written (no separator added).
    """
    items, spans, answers, lengths = cached_encoding(
        task, tokenizer, "multiple_choice", lambda: _encode_multiple_choice(task, tokenizer)
    )
    sums = [float(lp.sum()) for lp in token_logprobs(model, _fit(items, model), batch_size, pad_id_of(tokenizer))]
    hits, hits_norm = [], []
    for (lo, hi), answer in zip(spans, answers):
        raw = sums[lo:hi]
        norm = [s / n for s, n in zip(raw, lengths[lo:hi])]
        hits.append(max(range(len(raw)), key=raw.__getitem__) == answer)
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == answer)
    n = len(hits)
    acc, acc_norm = sum(hits) / n, sum(hits_norm) / n
    extra = {"acc_norm": acc_norm, "acc_norm_stderr": binomial_stderr(acc_norm, n)}
    return TaskResult(task.name, task.kind, "acc", acc, n, binomial_stderr(acc, n), extra=extra)


def _fit(items: list[tuple[list[int], int]], model) -> list[tuple[list[int], int]]:
    """Left-truncate sequences longer than the model's context, keeping the scored tail."""
    limit = model_max_length(model)
    if not limit:
        return items
    return [
        (ids[-limit:], max(start - max(len(ids) - limit, 0), 1)) if len(ids) > limit else (ids, start)
        for ids, start in items
    ]


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------
def _encode_perplexity(task: EvalTask, tokenizer) -> list[tuple[list[int], int]]:
    """``(ids, first scored position)``: text rows score every token after bos; prompt/completion rows the completion (+eos)."""
    rows = load_task_rows(task)
    if "text" in rows[0]:
        items = [encode_text(tokenizer, r["text"]) for r in rows]
        return [(ids, 1) for ids, _ in items]
    require_columns(task, rows, "prompt", "completion")
    items = [encode_prompt_completion(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return [(ids, next((i for i, label in enumerate(labels) if label != -100), len(ids))) for ids, labels in items]


def run_perplexity(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    """Token-weighted perplexity exp(sum NLL / N) over all scored tokens (eos included, as in training).

    stderr (delta method): ppl * std(token NLL) / sqrt(N).
    """
    items = cached_encoding(task, tokenizer, "perplexity", lambda: _encode_perplexity(task, tokenizer))
    nll = -torch.cat(token_logprobs(model, _truncate_right(items, model), batch_size, pad_id_of(tokenizer)))
    n = int(nll.numel())
    if n == 0:
        raise RecipeError(f"eval task '{task.name}': no tokens to score")
    mean = float(nll.mean())
    ppl = math.exp(mean) if mean < 700 else math.inf
    stderr = ppl * float(nll.std()) / math.sqrt(n) if n > 1 else 0.0
    return TaskResult(
        task.name, task.kind, "perplexity", ppl, n, stderr, higher_is_better=False, unit="ratio", extra={"nll": mean}
    )


def _truncate_right(items: list[tuple[list[int], int]], model) -> list[tuple[list[int], int]]:
    limit = model_max_length(model)
    return [(ids[:limit], start) for ids, start in items] if limit else items


# ---------------------------------------------------------------------------------------------
# kl_to_base
# ---------------------------------------------------------------------------------------------
def _encode_kl(task: EvalTask, tokenizer) -> list[list[int]]:
    """Texts as ``[bos] + text``; prompts as ``[bos] + prompt (+ completion)``."""
    rows = load_task_rows(task)
    if "text" in rows[0]:
        return [encode_text(tokenizer, r["text"], append_eos=False)[0] for r in rows]
    require_columns(task, rows, "prompt")
    return [
        encode_prompt_completion(tokenizer, r["prompt"], r.get("completion") or "", append_eos=False)[0] for r in rows
    ]


def run_kl_to_base(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    """Mean over every position of every sequence of KL(p_base || p_tuned) in nats; stderr = std / sqrt(N)."""
    sequences = cached_encoding(task, tokenizer, "kl_to_base", lambda: _encode_kl(task, tokenizer))
    limit = model_max_length(model)
    if limit:
        sequences = [ids[:limit] for ids in sequences]
    device = next(model.parameters()).device
    per_token = kl_per_token(
        model_logits(model), base_logits(model, base_model), sequences, batch_size, pad_id_of(tokenizer), device
    )
    kl = torch.cat(per_token)
    n = int(kl.numel())
    stderr = float(kl.std()) / math.sqrt(n) if n > 1 else 0.0
    return TaskResult(task.name, task.kind, "kl", float(kl.mean()), n, stderr, higher_is_better=False, unit="nats")


def run_lm_eval(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    from .lmeval import run_lm_eval_task

    return run_lm_eval_task(model, tokenizer, task, batch_size)


RUNNERS = {
    "exact_match": run_exact_match,
    "multiple_choice": run_multiple_choice,
    "perplexity": run_perplexity,
    "kl_to_base": run_kl_to_base,
    "lm_eval": run_lm_eval,
}


def run_task(model, tokenizer, task: EvalTask, batch_size: int, base_model=None) -> TaskResult:
    start = time.perf_counter()
    result = RUNNERS[task.kind](model, tokenizer, task, batch_size, base_model)
    result.seconds = time.perf_counter() - start
    return result
