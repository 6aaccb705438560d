"""Training throughput: ``ppft train`` (lora) versus a plain Hugging Face ``Trainer`` + PEFT loop.

Same random-init Llama, same data, batch, steps and LoRA settings, measured side by side in one
process. Reports tokens/s (non-padding tokens) over the timed steps, after warm-up steps.

    python bench/bench_train.py --out bench/results/train.json
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import bench_parser, interleaved, make_fixture, write_result
from lora_throughput import hf_trainer_tokens_per_s, ppft_tokens_per_s


def main() -> None:
    parser = bench_parser(__doc__, Path("bench/results/train.json"), steps=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_fixture(root, args.hidden, args.layers, n_rows=args.batch * args.steps)
        same = (model_dir, data, root, args.steps, args.batch, args.rank, 64)
        runs = interleaved(  # best of each: robust to a busy machine
            {"hf": lambda: hf_trainer_tokens_per_s(*same), "ppft": lambda: ppft_tokens_per_s(*same)}, args.repeats
        )
    hf, ppft = max(runs["hf"]), max(runs["ppft"])
    write_result(args.out, {
        "benchmark": "train_throughput_lora",
        "settings": vars(args) | {"out": str(args.out), "torch_threads": torch.get_num_threads()},
        "ppft_tokens_per_s": ppft,
        "hf_trainer_tokens_per_s": hf,
        "ratio_ppft_over_hf": ppft / hf,
        "all_runs_tokens_per_s": {"ppft": runs["ppft"], "hf": runs["hf"]},
        "target": ">= 1.0",
    })  # fmt: skip


if __name__ == "__main__":
    main()
