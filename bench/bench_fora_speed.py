"""FORA's full form against full fine-tuning at real widths: step time, side by side (issue 15).

A random-initialised model with Qwen3-0.6B's widths (bench/realshape.py: hidden 1024, MLP 3072, 16
query / 8 key-value heads of 128; ``--layers`` layers, lab vocabulary), float32, trained through
ppft's engine for ``--steps`` steps of ``--batch`` x ``--seq`` tokens (default 32 x 64 = 2048 per
step), each run in its own process. Rounds interleave the sections (full, then each FORA variant);
a section's ratio is the median over rounds of its median step time over full FT's in the same round
(neighbours in time share the machine's load). Steps are timed on the process's CPU clock by default
(one thread: the time spent computing, not waiting for a core on a shared machine); ``--clock wall``
on an idle machine.

Sections: ``fora_full`` (FORA's defaults, ``form: full``) and ``fora_full_half`` (``energy: 1``,
``max_rank: 0.5``: ``k = n / 2`` on every input, the most projection work ``min(k, n - k)`` can
cost). Calibration: ``C_p`` of random-character texts (high-rank activations). Per FORA section the
JSON records ``k`` per distinct input and the projection's multiply-adds per step against the
forward and backward's, ``4 sum_W m n min(k, n - k)`` vs ``6 sum_W m n T`` (module docs of optim.py).

    OMP_NUM_THREADS=1 python bench/bench_fora_speed.py --out bench/results/fora_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SECTIONS = {
    "full": {"name": "full"},
    "fora_full": {"name": "fora", "form": "full"},
    "fora_full_half": {"name": "fora", "form": "full", "energy": 1.0, "max_rank": 0.5},
}
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789=:"
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def write_texts(path: Path, rows: int, length: int, seed: int) -> Path:
    """``rows`` random-character texts of ``length`` characters (one token each in the lab tokenizer)."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": "".join(rng.choice(CHARS) for _ in range(length))}) + "\n" for _ in range(rows)))
    return path


def write_recipe(root: Path, label: str, section: dict, args) -> Path:
    recipe = {
        "model": {"name_or_path": str(root / "model"), "dtype": "float32"},
        "data": {"train": str(root / "task.jsonl"), "format": "text", "max_length": args.seq, "truncation": "right"},
        "method": section,
        "training": {"lr": 1e-5, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "warmup_steps": 0,
                     "schedule": "constant", "save_every": 0},  # fmt: skip
        "calibration": {"preserve_source": "dataset", "preserve_data": str(root / "preserve.jsonl"),
                        "num_samples": args.calibration_texts, "stats_batch_size": 8, "max_task_examples": 64,
                        "dir": str(root / "calibration")},  # fmt: skip
        "output": {"dir": str(root / f"run-{label}"), "overwrite": True},
    }
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def projection_work(model, tokens: int) -> dict:
    """``k`` per distinct input and the projections' multiply-adds against the forward + backward's."""
    from preserve_core.methods.fora.layer import ForaLinear

    inputs, projection, matmul = {}, 0, 0
    for name, layer in model.named_modules():
        if not isinstance(layer, ForaLinear):
            continue
        m, n = layer.base.weight.shape
        k = layer.projector.rank
        key = id(layer.right)
        entry = inputs.setdefault(key, {"n": n, "k": k, "layers": []})
        entry["layers"].append(name)
        projection += 4 * m * n * (min(k, n - k) + layer.u1.shape[1])
        matmul += 3 * m * n * tokens
    return {"inputs": list(inputs.values()), "projection_macs": projection, "target_matmul_macs": matmul,
            "predicted_ratio_on_targets": 1 + projection / matmul}  # fmt: skip


def child(recipe_path: str, label: str, clock: str) -> dict:
    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    with mock.patch("preserve_core.training.time", SimpleNamespace(perf_counter=CLOCKS[clock])):
        result = train(load_recipe(recipe_path), show_progress=False)  # step_seconds on the chosen clock
    logged = [m for m in result.metrics if "step_seconds" in m]
    warm = [m["step_seconds"] for m in logged[len(logged) // 3 :]]
    out = {"step_seconds_median": statistics.median(warm), "step_seconds": [m["step_seconds"] for m in logged],
           "tokens_per_step": logged[-1]["tokens"] / len(logged)}  # fmt: skip
    if label.startswith("fora"):
        out.update(projection_work(result.model, round(out["tokens_per_step"])))
    return out


def run_child(root: Path, label: str, args) -> dict:
    path = write_recipe(root, label, SECTIONS[label], args)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, __file__, "--child", str(path), "--label", label, "--clock", args.clock]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine(rounds: list[dict]) -> dict:
    out = {}
    for label in rounds[0]:
        runs = [r[label] for r in rounds]
        entry = {"step_seconds_median": statistics.median(r["step_seconds_median"] for r in runs),
                 "tokens_per_step": runs[0]["tokens_per_step"]}  # fmt: skip
        if label != "full":
            ratios = [r[label]["step_seconds_median"] / r["full"]["step_seconds_median"] for r in rounds]
            entry.update(ratio_to_full=statistics.median(ratios), ratio_per_round=ratios)
            entry.update({k: runs[0][k] for k in ("inputs", "projection_macs", "target_matmul_macs", "predicted_ratio_on_targets")})
        out[label] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-0.6b", help="A bench/realshape.py shape (smoke: tiny widths).")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64, help="Tokens per example (with the bos token).")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-texts", type=int, default=256)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--only", help="Comma-separated FORA sections (full always runs), e.g. fora_full")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/fora_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.label, args.clock)))
        return
    from realshape import build

    labels = ["full", *[s for s in SECTIONS if s != "full" and (not args.only or s in args.only.split(","))]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(args.shape, args.layers, root / "model")
        write_texts(root / "task.jsonl", args.batch * args.steps, args.seq - 1, seed=1)
        write_texts(root / "preserve.jsonl", args.calibration_texts, args.seq - 1, seed=2)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({label: run_child(root, label, args) for label in labels})
            print(json.dumps({k: v["step_seconds_median"] for k, v in rounds[-1].items()}), flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "label")}
    out = {"benchmark": "fora_full_vs_full_ft", "settings": settings, "threads": os.environ.get("OMP_NUM_THREADS"),
           "sections": combine(rounds), "rounds": rounds}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for label, entry in out["sections"].items():
        extra = f"  ratio {entry['ratio_to_full']:.2f}x full (flop model {entry['predicted_ratio_on_targets']:.2f}x on the targets), k per input {[i['k'] for i in entry['inputs']]} of {[i['n'] for i in entry['inputs']]}" if label != "full" else ""
        print(f"{label}: {entry['step_seconds_median']:.3f} s/step{extra}")


if __name__ == "__main__":
    main()
