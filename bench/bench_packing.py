"""Training throughput on a realistic length mix: ``ppft train`` (lora, ``data.packing``) versus HF ``Trainer`` + PEFT.

Example lengths are log-uniform between 16 and 512 tokens, so padding every row to the batch's
longest (what a Trainer with a padding collator does) wastes most of the compute. Measured side by
side in one process, interleaved, best of ``--repeats`` each: tokens/s counts real (non-padding)
tokens over the timed steps, after warm-up steps. Variants: HF Trainer (random batches, padded),
HF Trainer with ``train_sampling_strategy="group_by_length"``, ppft padded, ppft packed.

    python bench/bench_packing.py --out bench/results/packing.json
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

import torch
from common import bench_parser, interleaved, save_model, write_result
from conftest import write_jsonl
from lora_throughput import hf_trainer_tokens_per_s, ppft_tokens_per_s

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


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
    """The model (positions up to ``2 hi``) and ``n_rows`` rows of :func:`length_mix`."""
    return save_model(root, hidden, layers, max_positions=2 * hi), write_jsonl(root / "task.jsonl", length_mix(n_rows, lo, hi))


def main() -> None:
    parser = bench_parser(__doc__, Path("bench/results/packing.json"), steps=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lo", type=int, default=16)
    parser.add_argument("--hi", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_fixture(root, args.hidden, args.layers, args.batch * args.steps, args.lo, args.hi)
        same = (model_dir, data, root, args.steps, args.batch, args.rank, args.hi)
        variants = {
            "hf_trainer": lambda: hf_trainer_tokens_per_s(*same, strategy="random", clock=clock),
            "hf_trainer_group_by_length": lambda: hf_trainer_tokens_per_s(*same, strategy="group_by_length", clock=clock),
            "ppft_padded": lambda: ppft_tokens_per_s(*same, packing=False, clock=clock),
            "ppft_packed": lambda: ppft_tokens_per_s(*same, packing=True, clock=clock),
        }
        runs = interleaved(  # best of each: robust to a busy machine
            variants, args.repeats, report=lambda name, tokens_per_s: print(name, f"{tokens_per_s:.0f} tokens/s", flush=True)
        )
    best = {k: max(v) for k, v in runs.items()}
    write_result(args.out, {
        "benchmark": "train_throughput_lora_length_mix",
        "settings": vars(args) | {"out": str(args.out), "torch_threads": torch.get_num_threads(),
                                  "lengths": f"log-uniform {args.lo}..{args.hi} tokens"},
        "tokens_per_s": best,
        "ratio_ppft_packed_over_hf_trainer": best["ppft_packed"] / best["hf_trainer"],
        "ratio_ppft_packed_over_hf_group_by_length": best["ppft_packed"] / best["hf_trainer_group_by_length"],
        "ratio_ppft_packed_over_ppft_padded": best["ppft_packed"] / best["ppft_padded"],
        "all_runs_tokens_per_s": runs,
        "target": "ppft_packed / hf_trainer >= 1.2",
    })  # fmt: skip


if __name__ == "__main__":
    main()
