"""Training throughput on a realistic length mix: ``ppft train`` (lora, ``data.packing``) versus HF ``Trainer`` + PEFT.

Example lengths are log-uniform between 16 and 512 tokens, so padding every row to the batch's
longest (what a Trainer with a padding collator does) wastes most of the compute. Measured side by
side in one process, interleaved, best of ``--repeats`` each: tokens/s counts real (non-padding)
tokens over the timed steps, after warm-up steps. Variants: HF Trainer (random batches, padded),
HF Trainer with ``train_sampling_strategy="group_by_length"``, ppft padded, ppft packed.

    python bench/bench_packing.py --out bench/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_char_tokenizer, write_jsonl  # noqa: E402

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def length_mix(n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``n`` reversal rows whose token counts (``<bos> prompt completion <eos>``) are log-uniform in [lo, hi]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max(1, (total - 7) // 2)))
        rows.append({"prompt": f"rev:{word}=", "completion": word[::-1]})
    return rows


def make_fixture(root: Path, hidden: int, layers: int, n_rows: int, lo: int, hi: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * hi,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", write_jsonl(root / "task.jsonl", length_mix(n_rows, lo, hi))


def run_ppft(model_dir: Path, data: Path, root: Path, args, packing: bool) -> dict:
    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    recipe_path = root / "ppft.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": args.hi, "packing": packing},
        "method": {"name": "lora", "r": args.rank, "alpha": 2 * args.rank},
        "training": {"lr": 1e-3, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "max_grad_norm": 1.0},
        "output": {"dir": str(root / "ppft-run"), "overwrite": True},
    }))  # fmt: skip
    from unittest import mock

    with mock.patch("preserve_core.training.time", SimpleNamespace(perf_counter=CLOCKS[args.clock])):
        result = train(load_recipe(recipe_path), show_progress=False)  # step_seconds on the chosen clock
    logged = [m for m in result.metrics if "tokens_per_s" in m]
    cumulative = [m["tokens"] for m in logged]
    step_tokens = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    skip = args.steps // 5
    seconds = sum(t / m["tokens_per_s"] for t, m in zip(step_tokens[skip:], logged[skip:], strict=True))
    return {"tokens_per_s": sum(step_tokens[skip:]) / seconds}


class StepTimer:
    """A Trainer callback recording when each optimizer step ends, on ``clock``.

    A step's time is the gap between consecutive step ends, so, as in ppft's ``step_seconds``, it
    includes fetching and collating the step's batch (the Trainer fetches it before ``on_step_begin``).
    """

    def __init__(self, clock):
        from transformers import TrainerCallback

        ends = self.ends = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                ends.append(clock())

        self.callback = Callback()

    def step_times(self) -> list[float]:
        """Seconds of steps 1..n-1 (step 0 has no previous end)."""
        return [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=False)]


def run_hf_trainer(model_dir: Path, data: Path, root: Path, args, strategy: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from preserve_core.data import collate, load_rows, tokenize_rows
    from preserve_core.recipe_schema import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = tokenize_rows(load_rows(str(data)), tokenizer, DataConfig(train=str(data), max_length=args.hi))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=str(root / "hf-run"), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-3,
        lr_scheduler_type="cosine", logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
        train_sampling_strategy=strategy,
    )  # fmt: skip
    timer, counts = StepTimer(CLOCKS[args.clock]), []

    def collator(features):  # pad to the batch's longest row, as DataCollatorForSeq2Seq does
        batch = collate(features, tokenizer.pad_token_id)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[timer.callback])
    trainer.train()
    skip = args.steps // 5  # step_times()[i] is step i + 1
    return {"tokens_per_s": sum(counts[skip + 1 : args.steps]) / sum(timer.step_times()[skip:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/packing.json"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lo", type=int, default=16)
    parser.add_argument("--hi", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    args = parser.parse_args()
    variants = {
        "hf_trainer": lambda m, d, r: run_hf_trainer(m, d, r, args, "random"),
        "hf_trainer_group_by_length": lambda m, d, r: run_hf_trainer(m, d, r, args, "group_by_length"),
        "ppft_padded": lambda m, d, r: run_ppft(m, d, r, args, packing=False),
        "ppft_packed": lambda m, d, r: run_ppft(m, d, r, args, packing=True),
    }
    runs: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_fixture(root, args.hidden, args.layers, args.batch * args.steps, args.lo, args.hi)
        for _ in range(args.repeats):  # interleaved, best of each: robust to a busy machine
            for name, run in variants.items():
                runs[name].append(run(model_dir, data, root)["tokens_per_s"])
                print(name, f"{runs[name][-1]:.0f} tokens/s", flush=True)
    best = {k: max(v) for k, v in runs.items()}
    result = {
        "benchmark": "train_throughput_lora_length_mix",
        "settings": vars(args) | {"out": str(args.out), "torch_threads": torch.get_num_threads(),
                                  "lengths": f"log-uniform {args.lo}..{args.hi} tokens"},  # fmt: skip
        "tokens_per_s": best,
        "ratio_ppft_packed_over_hf_trainer": best["ppft_packed"] / best["hf_trainer"],
        "ratio_ppft_packed_over_hf_group_by_length": best["ppft_packed"] / best["hf_trainer_group_by_length"],
        "ratio_ppft_packed_over_ppft_padded": best["ppft_packed"] / best["ppft_padded"],
        "all_runs_tokens_per_s": runs,
        "target": "ppft_packed / hf_trainer >= 1.2",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
