"""Per-step cost of a regulariser on top of a method, measured A/B-interleaved in one process.

One model and method (default FORA's full form) are set up once through the engine with the
regularisers of ``--regularizers``; then steps alternate between the task loss alone (A) and the
task loss plus the regularisers' loss (B), each a full forward, backward and optimizer step. A
drifting machine load hits A and B alike, so the ratio of their median step times is robust where
separate runs are not.

    python bench/bench_regularizers.py --out bench/results/regularizers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, interleaved, write_recipe, write_result


def timed_step(loop, with_regularizers: bool) -> float:
    start = time.perf_counter()
    batch = loop.stream.next()
    outputs = loop.model(**batch)
    loss = outputs.loss
    if with_regularizers:
        loss = loss + loop.regularizers.extra_loss(loop.model, batch, outputs)
    loss.backward()
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default='{"name": "fora", "form": "full"}', help="Method section (JSON)")
    parser.add_argument("--regularizers", default='[{"name": "kl"}]', help="Regulariser list (JSON)")
    parser.add_argument("--steps", type=int, default=12, help="Steps of each kind (A and B alternate)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/regularizers.json")
    args = parser.parse_args()
    from bench_methods import write_fixture

    from preserve_core.checkpoint import TrainState
    from preserve_core.data import build_train_dataset
    from preserve_core.models import load_model, load_tokenizer
    from preserve_core.recipe import load_recipe
    from preserve_core.training import BatchStream, make_accelerator, setup_method

    method = {**json.loads(args.method), "regularizers": json.loads(args.regularizers)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = write_fixture(root, args.hidden, args.layers, rows=args.batch * 4 * args.steps)
        recipe = load_recipe(write_recipe(root / "r.yaml", {
            "model": {"name_or_path": str(model_dir)}, "data": {"train": str(data), "max_length": 64}, "method": method,
            "training": {"lr": 1e-4, "batch_size": args.batch},
            "calibration": {"preserve_source": "dataset", "preserve_data": str(root / "preserve.jsonl"), "num_samples": 64},
            "output": {"dir": str(root / "run")},
        }))  # fmt: skip
        accelerator = make_accelerator(recipe)
        tokenizer = load_tokenizer(recipe.model)
        model = load_model(recipe.model, accelerator.device)
        method_obj, model, regularizers = setup_method(recipe, model, tokenizer, accelerator)
        dataset, _ = build_train_dataset(recipe, tokenizer)
        dataset = regularizers.training_data(method_obj.training_data(dataset))
        loop = argparse.Namespace(model=model.train(), optimizer=method_obj.build_optimizer(model, recipe.training),
                                  regularizers=regularizers, stream=BatchStream(dataset, args.batch, 0, 0, 0, 1, TrainState()))  # fmt: skip
        timed_step(loop, True)  # warm-up
        seconds = interleaved({"A": lambda: timed_step(loop, False), "B": lambda: timed_step(loop, True)}, args.steps)
    a, b = seconds["A"], seconds["B"]
    write_result(args.out, {
        "benchmark": "regularizer_step_cost", "settings": {**vars(args), "out": str(args.out), "loadavg": os.getloadavg()},
        "without_seconds_median": statistics.median(a), "with_seconds_median": statistics.median(b),
        "ratio_with_over_without": statistics.median(b) / statistics.median(a),
        "ratio_of_pairs_median": statistics.median(y / x for x, y in zip(a, b, strict=True)),
    })  # fmt: skip


if __name__ == "__main__":
    main()
