"""LoRA training throughput of ``ppft train`` and of a plain Hugging Face ``Trainer`` + PEFT loop, on
the same model folder, data, batch, steps and LoRA settings (used by bench_train and bench_packing).

Both report tokens/s of real (non-padding) tokens over the timed steps: every step after the first
``steps // 5`` (warm-up). A step's time runs from the end of the previous step to its own end, so it
includes fetching and collating its batch, as ppft's ``step_seconds`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from common import write_recipe

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ppft_tokens_per_s(model_dir: Path, data: Path, root: Path, steps: int, batch: int, rank: int, max_length: int,
                      packing: bool | None = None, clock: Callable[[], float] | None = None) -> float:  # fmt: skip
    """``ppft train`` (lora, rank ``rank``, alpha ``2 rank``); ``packing``, when given, sets ``data.packing``.

    ``clock`` (default ``time.perf_counter``) replaces the clock ppft times its steps with.
    """
    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    data_section = {"train": str(data), "max_length": max_length} | ({} if packing is None else {"packing": packing})
    recipe_path = write_recipe(root / "ppft.yaml", {
        "model": {"name_or_path": str(model_dir)},
        "data": data_section,
        "method": {"name": "lora", "r": rank, "alpha": 2 * rank},
        "training": {"lr": 1e-3, "max_steps": steps, "batch_size": batch, "log_every": 1, "max_grad_norm": 1.0},
        "output": {"dir": str(root / "ppft-run"), "overwrite": True},
    })  # fmt: skip
    if clock is None:
        result = train(load_recipe(recipe_path), show_progress=False)
    else:
        with mock.patch("preserve_core.training.time", SimpleNamespace(perf_counter=clock)):
            result = train(load_recipe(recipe_path), show_progress=False)
    logged = [m for m in result.metrics if "tokens_per_s" in m]
    cumulative = [m["tokens"] for m in logged]
    step_tokens = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    skip = steps // 5
    seconds = sum(t / m["tokens_per_s"] for t, m in zip(step_tokens[skip:], logged[skip:], strict=True))
    return sum(step_tokens[skip:]) / seconds


class StepTimer:
    """A Trainer callback recording, on ``clock``, when each optimizer step ends."""

    def __init__(self, clock: Callable[[], float]):
        from transformers import TrainerCallback

        ends = self.ends = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                ends.append(clock())

        self.callback = Callback()

    def step_times(self) -> list[float]:
        """Seconds of steps 1..n-1 (step 0 has no previous end)."""
        return [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=False)]


def hf_trainer_tokens_per_s(model_dir: Path, data: Path, root: Path, steps: int, batch: int, rank: int, max_length: int,
                            strategy: str = "random", clock: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    """A ``Trainer`` with PEFT LoRA on every projection, batches padded to their longest row (as
    ``DataCollatorForSeq2Seq`` does); ``strategy`` is its ``train_sampling_strategy``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from preserve_core.data import collate, load_rows, tokenize_rows
    from preserve_core.recipe_schema import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = tokenize_rows(load_rows(str(data)), tokenizer, DataConfig(train=str(data), max_length=max_length))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(root / "hf-run"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        lr_scheduler_type="cosine", logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
        train_sampling_strategy=strategy,
    )  # fmt: skip
    timer, counts = StepTimer(clock), []

    def collator(features):
        padded = collate(features, tokenizer.pad_token_id)
        counts.append(int(padded["attention_mask"].sum()))
        return padded

    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer.callback]).train()
    skip = steps // 5  # step_times()[i] is step i + 1
    return sum(counts[skip + 1 : steps]) / sum(timer.step_times()[skip:])
