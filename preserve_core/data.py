"""Training data: loading through ``datasets``, tokenizing three formats, batching.

Formats
- ``prompt_completion``: ``[bos] + prompt + completion + [eos]``; loss on completion and eos only.
- ``text``: ``[bos] + text + [eos]``; loss on every token.
- ``messages``: the tokenizer's chat template; loss on assistant turns only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data_checks import DataReport, check_file_not_empty, count_unknown, finish, first_bad_jsonl_line, messages_field, text_field
from .errors import RecipeError
from .recipe_schema import DataConfig

IGNORE = -100
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(source: str, split: str = "train", subset: str | None = None):
    """A ``datasets.Dataset`` from a local file, ``lab:<skill>[@eval]`` or a hub data set name."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # its own "Failed to load JSON" lines; ours name the line
    if source.startswith("lab:"):
        from .lab import resolve_data_ref

        ref, _, lab_split = source.partition("@")
        source = resolve_data_ref(ref, lab_split or "train")
    path = Path(source)
    try:
        if path.suffix in LOADERS:
            if not path.is_file():
                raise RecipeError(f"data file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
            check_file_not_empty(path)
            return datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(source, subset, split=split)
    except RecipeError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        bad_line = first_bad_jsonl_line(path) if path.suffix == ".jsonl" and path.is_file() else None
        if bad_line:
            raise RecipeError(f"data file {path}, {bad_line}") from None
        raise RecipeError(f"cannot read data {source!r}: {type(e).__name__}: {e}") from None


def detect_format(columns: list[str], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        needed = {
            "prompt_completion": [cfg.prompt_column, cfg.completion_column],
            "text": [cfg.text_column],
            "messages": [cfg.messages_column],
        }[cfg.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise RecipeError(f"data: format {cfg.format} needs column(s) {missing}; the data has {columns}")
        return cfg.format
    if cfg.prompt_column in columns and cfg.completion_column in columns:
        return "prompt_completion"
    if cfg.messages_column in columns:
        return "messages"
    if cfg.text_column in columns:
        return "text"
    raise RecipeError(
        f"data: cannot tell the format from columns {columns}: expected prompt/completion, messages or text "
        "(rename with data.prompt_column / completion_column / text_column / messages_column)"
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_completion(tokenizer, prompt: str, completion: str, append_eos: bool = True) -> tuple[list, list]:
    """``(input_ids, labels)`` with loss on the completion (and eos) only."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    head = bos + _ids(tokenizer, prompt)
    tail = _ids(tokenizer, completion) + eos
    return head + tail, [IGNORE] * len(head) + tail


def encode_text(tokenizer, text: str, append_eos: bool = True) -> tuple[list, list]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    ids = bos + _ids(tokenizer, text) + eos
    return ids, list(ids)


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list, list]:
    """Chat template; loss on the tokens each assistant turn adds to the rendered conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data: messages format needs a tokenizer with a chat template")
    ids: list[int] = []
    labels: list[int] = []
    for i in range(len(messages)):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        full = list(full["input_ids"] if isinstance(full, dict) else full)
        added = full[len(ids) :]
        ids = full
        labels += added if messages[i]["role"] == "assistant" else [IGNORE] * len(added)
    return ids, labels


TruncationReport = DataReport  # the name the manifest's "truncation" entry was written under


def truncate(ids: list, labels: list, cfg: DataConfig, index: int, report: DataReport, source: str = "") -> tuple[list, list]:
    """Cut an example to ``report.limit`` tokens as ``data.truncation`` says (error: refuse)."""
    report.total += 1
    report.longest = max(report.longest, len(ids))
    if len(ids) <= report.limit:
        return ids, labels
    if cfg.truncation == "error":
        over_context = report.limit == report.context and report.limit < cfg.max_length
        bound = f"the model's context of {report.context} positions" if over_context else f"data.max_length={cfg.max_length}"
        raise RecipeError(
            f"data: {source or cfg.train}, row {index + 1} has {len(ids)} tokens, over {bound}. "
            + (f"Lower data.max_length to {report.context} or less, or set" if over_context else "Raise data.max_length or set")
            + " data.truncation: right (or left) to cut long examples."
        )
    report.truncated += 1
    keep = slice(-report.limit, None) if cfg.truncation == "left" else slice(0, report.limit)
    return ids[keep], labels[keep]


def encode_row(row: dict, fmt: str, tokenizer, cfg: DataConfig, index: int, source: str) -> tuple[list, list, str, str | None]:
    """``(input_ids, labels, text, completion or None)`` of one row; fields checked (file, row, field on error)."""
    if fmt == "prompt_completion":
        prompt = text_field(row, cfg.prompt_column, index, source)
        completion = text_field(row, cfg.completion_column, index, source)
        ids, labels = encode_prompt_completion(tokenizer, prompt, completion, cfg.append_eos)
        return ids, labels, prompt + completion, completion
    if fmt == "text":
        text = text_field(row, cfg.text_column, index, source)
        return (*encode_text(tokenizer, text, cfg.append_eos), text, None)
    turns = messages_field(row, cfg.messages_column, index, source)
    return (*encode_messages(tokenizer, turns), "".join(t["content"] for t in turns), None)


def tokenize_rows(rows, tokenizer, cfg: DataConfig, context: int | None = None, source: str | None = None):
    """Tokenize a ``datasets.Dataset`` into ``input_ids``/``labels`` columns; returns (dataset, report).

    Examples are cut to ``min(data.max_length, context)`` (``context``: the model's positions).
    """
    import datasets

    source = source or cfg.train
    if len(rows) == 0:
        raise RecipeError(f"data: {source} has no examples")
    if cfg.max_examples:
        rows = rows.select(range(min(cfg.max_examples, len(rows))))
    fmt = detect_format(rows.column_names, cfg)
    report = DataReport(limit=min(cfg.max_length, context or cfg.max_length), context=context)
    out = {"input_ids": [], "labels": []}
    for i, row in enumerate(rows):
        ids, labels, text, completion = encode_row(row, fmt, tokenizer, cfg, i, source)
        count_unknown(report, tokenizer, ids, text)
        report.empty_completions += completion is not None and not completion.strip()
        ids, labels = truncate(ids, labels, cfg, i, report, source)
        if all(label == IGNORE for label in labels):
            raise RecipeError(
                f"data: {source}, row {i + 1} has no tokens to learn from (empty completion without EOS, or cut away)"
            )
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    finish(report, source, cfg.truncation, fmt)
    return datasets.Dataset.from_dict(out), report


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids``, ``attention_mask``, ``labels`` of shape [B, T]."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pack(features: list[dict], pad_token_id: int, width: int) -> dict[str, torch.Tensor]:
    """The examples laid end to end in rows of at most ``width`` tokens (first-fit, longest first).

    Returns ``input_ids``, ``labels`` and ``position_ids`` of shape [R, T], R <= len(features), T the
    longest row. Position ids restart at 0 for every example (and for a row's padded tail); with no
    ``attention_mask``, transformers reads the restarts as example boundaries and attends block-
    diagonally (causal within an example, nothing across). The first label of every example is
    ignored: it would be the target of the previous example's last token; unpacked, no position
    predicts it either, so the loss is over the same tokens as :func:`collate`'s.
    """
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = len(features[i]["input_ids"])
        slot = next((r for r, u in enumerate(used) if u + n <= width), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
        rows[slot].append(i)
        used[slot] += n
    T = max(used)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            ids, lab = features[i]["input_ids"], features[i]["labels"]
            input_ids[r, start : start + len(ids)] = torch.tensor(ids)
            labels[r, start + 1 : start + len(ids)] = torch.tensor(lab[1:], dtype=torch.long)
            position_ids[r, start : start + len(ids)] = torch.arange(len(ids))
            start += len(ids)
        position_ids[r, start:] = torch.arange(T - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@torch.no_grad()
def check_packing_support(model, vocab_size: int) -> None:
    """Refuse ``data.packing`` for a model whose attention does not separate packed examples.

    Two short random sequences, packed in one row, must give the logits each gives alone.
    """
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(4, vocab_size, (1, n), generator=g) for n in (6, 4))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=x.to(device), use_cache=False).logits for x in (a, b)], dim=1)
        positions = torch.cat([torch.arange(6), torch.arange(4)])[None].to(device)
        packed = model(input_ids=torch.cat([a, b], dim=1).to(device), position_ids=positions, use_cache=False).logits
    except TypeError as e:
        raise RecipeError(f"data.packing: this model does not take position ids ({e}); set data.packing: false") from None
    finally:
        model.train(was_training)
    scale = float(alone.abs().max()) + 1.0
    if not torch.allclose(packed.float(), alone.float(), rtol=0.0, atol=0.02 * scale):
        raise RecipeError(
            "data.packing: this model's attention does not keep packed examples apart (position-id restarts are "
            "not read as boundaries by its attention implementation); set data.packing: false"
        )


def build_train_dataset(recipe, tokenizer):
    from .models import context_length

    rows = load_rows(recipe.data.train, recipe.data.split, recipe.data.subset)
    return tokenize_rows(rows, tokenizer, recipe.data, context_length(recipe.model), recipe.data.train)


def build_eval_dataset(recipe, tokenizer):
    from .models import context_length

    if not recipe.data.eval:
        return None, None
    rows = load_rows(recipe.data.eval, recipe.data.eval_split, recipe.data.subset)
    return tokenize_rows(rows, tokenizer, recipe.data, context_length(recipe.model), recipe.data.eval)


def data_fingerprint(source: str) -> str:
    """sha256 of a local data file; the name itself for hub data sets and lab refs."""
    from .models import file_sha256

    path = Path(source)
    return file_sha256(path) if path.is_file() else f"ref:{source}"
