"""GPU check: throughput, MFU, peak memory and FORA's bf16 guarantee at the Qwen3-1.7B shape, offline.

Builds a random-initialised Qwen3 with Qwen3-1.7B's published widths (hidden 2048, MLP 6144, 16 query
heads and 8 key/value heads of 128, tied embeddings, vocabulary 151936) but only ``--layers`` layers,
saved in float32 (the master weights), and trains each method through ppft's own engine with
``mixed_precision: bf16`` (autocast) on random-letter text. Per method, in its own process: tokens/s
(median over the steps after the first fifth), MFU, peak device memory of training (calibration's
peak reported apart), and for FORA ``||dW Q||_F / ||dW||_F`` over every target layer, where ``dW`` is
the trained update without the spectral channel (full form: ``W - W_0``; LoRA form: ``B' A'``) and
``Q`` the protected input basis: ~0 means the projection survived bf16 autocast. ``full`` reports the
same ratio for an unprojected update as the reference (about ``sqrt(k / n)``, far from 0).

MFU = model FLOPs per token x tokens/s / peak dense bf16 FLOPs, with the PaLM count
``6 N + 12 L h s`` per token (``N``: matmul parameters incl. the LM head; ``L`` layers, ``h`` query
width, ``s`` sequence length) for every method, so adapter methods (which skip the frozen weights'
gradients, ~4N) are measured against the same yardstick. The peak comes from the device name
(``PEAK_BF16_TFLOPS``) or ``--peak-tflops``.

    bash bench/gpu_check.sh                 # on a CUDA machine: ~5 minutes on one H100/H200
    python bench/gpu_check.py --smoke       # CPU: tiny widths, a few steps (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' data sheets; first match wins
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0),
    ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]  # fmt: skip

QWEN3_1_7B = {"hidden": 2048, "intermediate": 6144, "heads": 16, "kv_heads": 8, "head_dim": 128, "vocab": 151936}
SMOKE = {"hidden": 64, "intermediate": 192, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 1024}

METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 16, "alpha": 32},
    "fora_lora": {"name": "fora", "form": "lora", "r": 16, "alpha": 32},
    "fora_lora_leak": {"name": "fora", "form": "lora", "r": 16, "alpha": 32, "regularizers": [{"name": "leak"}]},
    "fora_full": {"name": "fora", "form": "full"},
    "folora": {"name": "folora", "r": 16, "alpha": 32},
    "kl": {"name": "kl", "strength": 1.0},
}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def flops_per_token(shape: dict, layers: int, seq: int) -> float:
    """PaLM's training FLOPs per token: ``6 N + 12 L h s`` (module docstring)."""
    d, q, kv = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * shape["intermediate"]
    n_matmul = layers * per_layer + shape["vocab"] * d
    return 6 * n_matmul + 12 * layers * q * seq


# ---------------------------------------------------------------------------------------------
# fixture: model, tokenizer, data, recipes
# ---------------------------------------------------------------------------------------------
def write_fixture(root: Path, shape: dict, layers: int, seq: int, rows: int) -> Path:
    """A float32 random Qwen3 of ``shape`` with a character tokenizer; task and preserve texts of ``seq`` letters."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import build_char_tokenizer, write_jsonl

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=max(4096, seq + 8), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    texts = ["".join(chr(97 + int(i)) for i in torch.randint(0, 26, (seq,), generator=g)) for _ in range(rows)]
    write_jsonl(root / "task.jsonl", [{"text": t} for t in texts])
    write_jsonl(root / "preserve.jsonl", [{"text": t[::-1]} for t in texts])
    return root / "model"


def recipe_for(root: Path, label: str, args, section: dict) -> Path:
    recipe = {
        "model": {"name_or_path": str(root / "model"), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": str(root / "task.jsonl"), "format": "text", "max_length": args.seq + 2, "truncation": "right"},
        "method": section,
        "training": {"lr": 1e-4, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1, "warmup_steps": 0,
                     "mixed_precision": "bf16", "schedule": "constant"},  # fmt: skip
        "calibration": {"preserve_source": "dataset", "preserve_data": str(root / "preserve.jsonl"),
                        "num_samples": args.calibration_samples, "max_task_examples": args.calibration_samples,
                        "stats_batch_size": 4, "fisher_samples": 4},  # fmt: skip
        "output": {"dir": str(root / f"run-{label}"), "overwrite": True},
    }
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------------------------------------
# one method (in its own process on a GPU)
# ---------------------------------------------------------------------------------------------
def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: process peak RSS (cumulative)


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def calibrate_first(recipe) -> tuple[float, float]:
    """Run the recipe's calibration (if its method needs one) before training; returns (seconds, peak MB)."""
    from preserve_core.calibration import ensure_calibration
    from preserve_core.methods import METHODS
    from preserve_core.models import load_model, load_tokenizer
    from preserve_core.training import make_accelerator

    method_cls = METHODS[recipe.method.name]
    if not method_cls.needs_for(recipe.method) and not method_cls.has_calibration_extra(recipe.method):
        return 0.0, 0.0
    reset_peak()
    start = time.perf_counter()
    accelerator = make_accelerator(recipe)
    model = load_model(recipe.model, accelerator.device)
    ensure_calibration(recipe, model, load_tokenizer(recipe.model), method_cls, accelerator)
    seconds, peak = time.perf_counter() - start, peak_memory_mb()
    del model
    return seconds, peak


def projection_leak(model, initial: dict) -> dict:
    """Over every FORA layer: ``dW_Q_over_dW`` = ``||dW Q||_F / ||dW||_F`` (~0 when ``dW Q = 0`` held),
    ``dW_Q_over_dW_if_blind`` = ``sqrt(sum_l (k_l / n_l) ||dW_l||^2 / sum_l ||dW_l||^2)`` (what a ``dW`` blind
    to ``Q`` gives in expectation, ``E ||X Q||^2 = (k / n) ||X||^2``: the scale "not ~0" means), and
    ``dW_Q_over_W`` = ``||dW Q||_F / ||W||_F``: on bf16 weights the projected AdamW's float32 master obeys
    ``dW Q = 0`` and the stored weight is one rounding from it, so this stays <= 2^-8 = 0.0039 however
    small ``dW`` is (while ``dW_Q_over_dW`` is large when ``dW`` is not much above bf16's resolution of ``W``).
    """
    from preserve_core.methods.fora.layer import ForaLinear

    leak, total, blind, weight = 0.0, 0.0, 0.0, 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, ForaLinear):
            continue
        if layer.r:
            a, b = layer.branch_factors()
            delta = (b @ a).detach().double().cpu()
        else:
            delta = layer.base.weight.detach().double().cpu() - initial[f"{name}.base.weight"].to(layer.base.weight.dtype).double()
        q = layer.q.detach().double().cpu()
        size = float(delta.pow(2).sum())
        leak += float((delta @ q).pow(2).sum())
        total += size
        blind += size * q.shape[1] / q.shape[0]
        weight += float(layer.base.weight.detach().double().pow(2).sum())
    if not total:
        return {}
    return {"dW_Q_over_dW": (leak / total) ** 0.5, "dW_Q_over_dW_if_blind": (blind / total) ** 0.5,
            "dW_Q_over_W": (leak / weight) ** 0.5}  # fmt: skip


def child(recipe_path: str, label: str) -> dict:
    """Calibrate, then train one method; measurements as a dict."""
    from safetensors.torch import load_file

    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    recipe = load_recipe(recipe_path)
    calibration_seconds, calibration_peak = calibrate_first(recipe)
    initial = {f"{k.removesuffix('.weight')}.base.weight": v for k, v in load_file(Path(recipe.model.name_or_path) / "model.safetensors").items()}
    reset_peak()
    start = time.perf_counter()
    result = train(recipe, show_progress=False)
    rates = [m["tokens_per_s"] for m in result.metrics if "tokens_per_s" in m]
    warm = rates[len(rates) // 5 :] or rates
    out = {
        "tokens_per_s": statistics.median(warm),
        "train_seconds": time.perf_counter() - start,
        "peak_train_mb": peak_memory_mb(),
        "calibration_seconds": calibration_seconds,
        "peak_calibration_mb": calibration_peak,
        "final_loss": result.final_loss,
    }
    if label.startswith("fora"):
        out.update(projection_leak(result.model, initial))
    return out


# ---------------------------------------------------------------------------------------------
# the whole check
# ---------------------------------------------------------------------------------------------
def run_one(root: Path, label: str, args, section: dict, dtype: str = "float32") -> dict:
    path = recipe_for(root, label, args, section)
    if dtype != "float32":
        recipe = yaml.safe_load(path.read_text())
        recipe["model"]["dtype"] = dtype
        path.write_text(yaml.safe_dump(recipe))
    if args.in_process:
        return child(str(path), label)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--label", label], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_summary(args) -> dict:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    precision = "bf16 autocast" if torch.cuda.is_available() else "float32 (no bf16 autocast on CPU)"
    return {"device": name, "peak_bf16_tflops": peak_tflops(name, args.peak_tflops), "torch": torch.__version__,
            "precision": precision}  # fmt: skip


def add_mfu(results: dict, shape: dict, args, peak: float | None) -> None:
    per_token = flops_per_token(shape, args.layers, args.seq)
    for r in results.values():
        if "tokens_per_s" in r:
            r["model_tflops_per_s"] = per_token * r["tokens_per_s"] / 1e12
            r["mfu"] = r["model_tflops_per_s"] / peak if peak else None


def markdown(out: dict) -> str:
    s, d = out["settings"], out["device"]
    rows = [
        f"# GPU check ({d['device']}, peak {d['peak_bf16_tflops']} bf16 TFLOP/s, torch {d['torch']})", "",
        f"Qwen3-1.7B widths{' (smoke: tiny widths)' if s['smoke'] else ''}, {s['layers']} layers, vocab {out['shape']['vocab']}, "
        f"{s['batch']} x {s['seq']} tokens per step, {s['steps']} steps, {d['precision']}, fp32 master weights "
        f"(fora_full_bf16_weights: bf16 weights, the projected AdamW keeping float32 masters). Took {out['seconds']:.0f} s.", "",
        "| method | tokens/s | MFU | peak train MB | calibration s | peak calibration MB | dW Q / dW (blind) | dW Q / W |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for label, r in out["methods"].items():
        if "error" in r:
            rows.append(f"| {label} | error: {r['error']} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        leak = f"{r['dW_Q_over_dW']:.1e} ({r['dW_Q_over_dW_if_blind']:.2f})" if r.get("dW_Q_over_dW") is not None else "-"
        leak_w = f"{r['dW_Q_over_W']:.1e}" if r.get("dW_Q_over_W") is not None else "-"
        rows.append(
            f"| {label} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_train_mb']:,.0f} | {r['calibration_seconds']:.1f} "
            f"| {r['peak_calibration_mb']:,.0f} | {leak} | {leak_w} |"
        )
    return "\n".join(rows) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny widths, a few steps, in one process (CPU test).")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024, help="Tokens per example.")
    parser.add_argument("--batch", type=int, default=8, help="Examples per step.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=None, help="Vocabulary (default 151936, Qwen3's).")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak dense bf16 TFLOP/s (default: from the device name).")
    parser.add_argument("--only", help="Comma-separated labels, e.g. full,lora,fora_full")
    parser.add_argument("--in-process", action="store_true", help="Run every method in this process (no per-method peak).")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_check.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.batch, args.steps, args.calibration_samples, args.in_process = 32, 2, 3, 8, True
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.label)))
        return
    shape = dict(SMOKE if args.smoke else QWEN3_1_7B)
    if args.vocab:
        shape["vocab"] = args.vocab
    labels = {**METHODS, "fora_full_bf16_weights": METHODS["fora_full"]}
    if args.only:
        labels = {k: v for k, v in labels.items() if k in args.only.split(",")}
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fixture(root, shape, args.layers, args.seq, rows=max(args.batch * args.steps, args.calibration_samples))
        for label, section in labels.items():
            dtype = "bfloat16" if label.endswith("bf16_weights") else "float32"
            results[label] = run_one(root, label, args, section, dtype)
            print(label, json.dumps(results[label]), flush=True)
    device = device_summary(args)
    add_mfu(results, shape, args, device["peak_bf16_tflops"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "label")}
    out = {"benchmark": "gpu_check", "device": device, "shape": shape, "settings": settings,
           "seconds": time.perf_counter() - start, "methods": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
