"""What the run-safety checks cost: the per-step finiteness guard and checkpoint checksums.

Full fine-tuning (every trainable weight has two Adam moments: the most state to check) of a
random-init Llama. Each cost is timed inside the same run as what it is compared with, so a busy
machine slows both alike:

- the guard (weights and optimizer moments checked after each update) as a fraction of the step;
- ``SHA256SUMS`` (fsync + sha256 of every file) as a fraction of the checkpoint save.

Best (lowest) fraction of ``--repeats`` runs.

    python bench/bench_guards.py --out bench/results/guards.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import bench_parser, make_fixture, write_recipe, write_result


def _timed(fn, into: list):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - start)
        return out

    return timed


def timed_run(recipe_path: Path) -> dict:
    """Seconds per step and in the guard; seconds per checkpoint save and in its checksums."""
    from preserve_core import checkpoint, training
    from preserve_core.recipe import load_recipe

    times = {"step": [], "guard": [], "save": [], "checksums": []}
    originals = (training.TrainingLoop.one_step, training.TrainingLoop._state_finite, training.save_checkpoint, checkpoint.write_checksums)
    training.TrainingLoop.one_step = _timed(originals[0], times["step"])
    training.TrainingLoop._state_finite = _timed(originals[1], times["guard"])
    training.save_checkpoint = _timed(originals[2], times["save"])
    checkpoint.write_checksums = _timed(originals[3], times["checksums"])
    try:
        training.train(load_recipe(recipe_path), show_progress=False)
    finally:
        training.TrainingLoop.one_step, training.TrainingLoop._state_finite = originals[0], originals[1]
        training.save_checkpoint, checkpoint.write_checksums = originals[2], originals[3]
    steps = len(times["step"])
    guard_in_steps = sum(times["guard"][:steps])  # the last call is the pre-save check, outside any step
    return {
        "step_seconds": sum(times["step"]) / steps,
        "guard_seconds_per_step": guard_in_steps / steps,
        "guard_fraction_of_step": guard_in_steps / sum(times["step"]),
        "save_seconds": sum(times["save"]),
        "checksum_seconds": sum(times["checksums"]),
        "checksum_fraction_of_save": sum(times["checksums"]) / sum(times["save"]),
    }


def main() -> None:
    parser = bench_parser(__doc__, Path("bench/results/guards.json"), steps=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_fixture(root, args.hidden, args.layers, n_rows=args.batch * args.steps)
        recipe = write_recipe(root / "recipe.yaml", {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "training": {"lr": 1e-4, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "save_every": args.steps},
            "output": {"dir": str(root / "run"), "overwrite": True},
        })  # fmt: skip
        runs = [timed_run(recipe) for _ in range(args.repeats)]
        checkpoint_bytes = sum(p.stat().st_size for p in (root / "run").glob("checkpoint-*/*") if p.is_file())
    write_result(args.out, {
        "benchmark": "run_safety_overhead_full_ft",
        "settings": vars(args) | {"out": str(args.out), "torch_threads": torch.get_num_threads()},
        "checkpoint_bytes": checkpoint_bytes,
        "guard_fraction_of_step": min(r["guard_fraction_of_step"] for r in runs),
        "checksum_fraction_of_save": min(r["checksum_fraction_of_save"] for r in runs),
        "all_runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
