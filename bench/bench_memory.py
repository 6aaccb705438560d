"""Memory and disk of calibration, set-up and checkpoints at real widths, 1-2 layers, against the memory model.

For each shape (``--shapes``), depth (``--layers``) and method (fora LoRA form, folora, lora), one fresh
subprocess: load the random-init model (bench/realshape.py), run ``ensure_calibration`` (peak RSS over
the phase, bytes on disk), the method's set-up (peak RSS, bytes of the tensors it holds), one training
step and a checkpoint (bytes on disk). Peak RSS is sampled every 2 ms by a thread; "peak" is the phase's
maximum minus the RSS when the phase started. Each number sits beside the prediction of
bench/memory_model.py; ``within_15pct`` says whether they agree.

    python bench/bench_memory.py --out bench/results/memory.json

``--stats-budgets none 0.6 0.3`` measures only the statistics pass, once per ``calibration.stats_memory_gb``
(``none``: one pass), and records the passes, the bytes of sums held (exact) and the peak RSS.
``--init-budgets none 0.06`` measures only FORA's ``init: gradient`` set-up the same way (passes, peak RSS,
a hash of the ``A`` it sets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import memory_model as mm  # noqa: E402
from realshape import SHAPES, build  # noqa: E402

METHODS = {
    "fora": {"name": "fora", "form": "lora", "r": 8, "alpha": 16},
    "fora_u0_s0": {"name": "fora", "form": "lora", "r": 8, "alpha": 16, "u_rank": 0, "spectral_size": 0},
    "fora_u0_s0_leak": {"name": "fora", "form": "lora", "r": 8, "alpha": 16, "u_rank": 0, "spectral_size": 0,
                        "regularizers": [{"name": "leak"}]},  # fmt: skip
    "folora": {"name": "folora", "r": 8, "alpha": 16},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
}
PRESERVE_TEXTS, LENGTH, STATS_BATCH = 32, 256, 8
STATS_TEXTS = 8  # --stats-budgets: the sums' size does not depend on the token count
INIT_ROWS = 8  # --init-budgets: G's size does not depend on the rows


class RssPeak:
    """Samples this process's resident set size (bytes) on a thread; ``phase()`` returns (start, peak)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._run = interval, 0, True
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._loop, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while self._run:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def measure(self, fn):
        """``(result, rss_at_start, peak_over_start)`` of ``fn()``."""
        start = self.rss()
        self.peak = start
        result = fn()
        time.sleep(5 * self.interval)
        return result, start, max(self.peak, self.rss()) - start


def held_bytes(model, kinds: tuple[type, ...]) -> int:
    """Bytes of distinct tensors (by storage) the wrappers of ``kinds`` hold as buffers."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, kinds):
            for _, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.untyped_storage().data_ptr() not in seen:
                    seen.add(buffer.untyped_storage().data_ptr())
                    total += buffer.untyped_storage().nbytes()
    return total


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_recipe(work: Path, model_dir: Path, method: dict) -> Path:
    import yaml

    from preserve_core.lab import resolve_data_ref

    work.mkdir(parents=True, exist_ok=True)
    preserve = work / "preserve.jsonl"
    rng = random.Random(0)  # random characters: high-rank activations, so k reaches realistic sizes
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789=:") for _ in range(LENGTH)) for _ in range(PRESERVE_TEXTS)]
    preserve.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": resolve_data_ref("lab:shift"), "max_length": LENGTH},
        "method": method,
        "training": {"lr": 1e-4, "max_steps": 1, "batch_size": 4},
        "calibration": {"preserve_source": "dataset", "preserve_data": str(preserve), "num_samples": PRESERVE_TEXTS,
                        "stats_batch_size": STATS_BATCH, "max_task_examples": 64, "dir": str(work / "calibration")},
        "output": {"dir": str(work / "run")},
    }  # fmt: skip
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def forward_peak(sampler: RssPeak, model, length: int = LENGTH, batch: int = STATS_BATCH) -> int:
    """Peak RSS of one no-grad forward over a statistics batch: the activations any forward needs."""
    import torch

    ids = torch.randint(4, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up: allocator and kernel caches
        return sampler.measure(lambda: model(input_ids=ids, use_cache=False))[2]


def stats_peak(sampler: RssPeak, model, tokenizer, recipe) -> int:
    """Peak of accumulating one statistic (C_p over the preserve texts): what sits on the device."""
    from preserve_core.calibration.batches import encode_preserve_text, preserve_batches
    from preserve_core.calibration.pipeline import dataset_texts
    from preserve_core.calibration.stats import accumulate_input_stats
    from preserve_core.models import resolve_target_modules

    texts = dataset_texts(recipe.calibration.preserve_data, PRESERVE_TEXTS, recipe.calibration.seed)
    sequences = [encode_preserve_text(tokenizer, t, LENGTH) for t in texts]
    batches = preserve_batches(sequences, tokenizer, LENGTH, STATS_BATCH)
    targets = resolve_target_modules(model, None)
    return sampler.measure(lambda: accumulate_input_stats(model, targets, batches, "all"))[2]


def stats_budget_worker(model_dir: Path, budget: str, out: Path) -> None:
    """One statistics pass (C_p over the preserve texts) under ``stats_memory_gb = budget`` in this (fresh)
    process. The packed triangles go to a ``meta`` tensor: on a GPU they leave for the host, so the peak
    measured is the device's (sums, one block's packed rows, the forward)."""
    import torch

    from preserve_core.calibration.batches import encode_preserve_text, preserve_batches
    from preserve_core.calibration.pipeline import dataset_texts
    from preserve_core.calibration.stats import input_stats_passes
    from preserve_core.models import load_model, load_tokenizer, resolve_target_modules
    from preserve_core.recipe import load_recipe

    torch.set_num_threads(1)
    sampler = RssPeak()
    recipe = load_recipe(write_recipe(out.parent / f"work-stats-{budget}", model_dir, METHODS["lora"]))
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, "cpu").eval()
    texts = dataset_texts(recipe.calibration.preserve_data, STATS_TEXTS, recipe.calibration.seed)
    batches = preserve_batches([encode_preserve_text(tokenizer, t, LENGTH) for t in texts], tokenizer, LENGTH, STATS_BATCH)
    targets = resolve_target_modules(model, None)
    budget_bytes = None if budget == "none" else int(float(budget) * 1e9)
    result = {"stats": ["preserve"], "budget_gb": budget, "forward_peak": forward_peak(sampler, model), "held": []}

    def run() -> None:
        for part in input_stats_passes(model, targets, batches, "all", budget_bytes=budget_bytes):
            result["held"].append(sum(g.nbytes() for g in part.sums.values()))
            part.pop_packed_covs("meta")

    start = time.perf_counter()
    result["stats_peak"] = sampler.measure(run)[2]
    result["stats_seconds"], result["passes"], result["stats_held"] = time.perf_counter() - start, len(result["held"]), max(result["held"])
    out.write_text(json.dumps(result))


def init_budget_worker(model_dir: Path, budget: str, out: Path) -> None:
    """FORA's LoRA form with ``init: gradient`` (``INIT_ROWS`` rows) set up under ``stats_memory_gb = budget``
    in this (fresh) process: the peak RSS of the gradient start, and, measured alone, that of one plain
    forward and backward of the same rows and of one SVD of the largest target's ``G P`` (the transients;
    what is left is the ``G`` held), its passes, and a hash of the ``A`` it sets (the same for every budget)."""
    import hashlib

    import torch
    from accelerate.utils import set_seed

    from preserve_core.calibration import ensure_calibration
    from preserve_core.data import build_train_dataset
    from preserve_core.methods import METHODS as REGISTRY
    from preserve_core.models import load_model, load_tokenizer
    from preserve_core.recipe import load_recipe
    from preserve_core.training import init_batches, make_accelerator, setup_method

    torch.set_num_threads(1)
    sampler = RssPeak()
    method = {**METHODS["fora_u0_s0"], "init": "gradient", "init_rows": INIT_ROWS}
    recipe_path = write_recipe(out.parent / f"work-init-{budget}", model_dir, method)
    gb = None if budget == "none" else float(budget)
    recipe = load_recipe(recipe_path, [f"calibration.stats_memory_gb={'null' if gb is None else gb}"])
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, "cpu").eval()
    ensure_calibration(recipe, model, tokenizer, REGISTRY[recipe.method.name])
    set_seed(recipe.training.seed)  # as the engine: the Kaiming A whose norm the aligned rows take
    fora, model, _ = setup_method(recipe, model, tokenizer, make_accelerator(recipe))
    dataset, _ = build_train_dataset(recipe, tokenizer)
    batches = list(init_batches(dataset, INIT_ROWS, recipe, tokenizer, "cpu"))

    def backward() -> None:
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    backward()  # warm-up: allocator and kernel caches
    widest = max(fora.layers.values(), key=lambda layer: layer.weight.numel())
    grad = torch.randn(widest.weight.shape, generator=torch.Generator().manual_seed(0))

    def svd() -> None:  # align_a's work on the largest target: G P and its thin SVD (A itself is untouched)
        torch.linalg.svd(widest.projector(grad), full_matrices=False)

    svd()
    result_svd = sampler.measure(svd)[2]
    del grad
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    result = {"budget_gb": budget, "backward_peak": sampler.measure(backward)[2], "svd_peak": result_svd}
    forwards.clear()
    start = time.perf_counter()
    result["init_peak"] = sampler.measure(lambda: fora.init_from_data(model, iter(batches)))[2]
    result["init_seconds"], result["passes"] = time.perf_counter() - start, len(forwards) // len(batches)
    a = torch.cat([layer.lora_A.detach().flatten() for layer in fora.layers.values()])
    result["a_sha256"] = hashlib.sha256(a.numpy().tobytes()).hexdigest()[:16]
    out.write_text(json.dumps(result))


def worker(model_dir: Path, method_key: str, out: Path, calibration_only: bool = False) -> None:
    """One measurement in this (fresh) process; writes a JSON dict to ``out``."""
    import torch

    from preserve_core.calibration import ensure_calibration, stats_needed
    from preserve_core.checkpoint import TrainState, save_checkpoint
    from preserve_core.methods import METHODS as REGISTRY
    from preserve_core.methods.fora.layer import ForaLinear
    from preserve_core.methods.folora.layer import FoloraLinear
    from preserve_core.models import load_model, load_tokenizer
    from preserve_core.recipe import load_recipe
    from preserve_core.training import build_scheduler, make_accelerator, setup_method

    torch.set_num_threads(1)
    sampler = RssPeak()
    work = out.parent / f"work-{method_key}"
    recipe = load_recipe(write_recipe(work, model_dir, METHODS[method_key]))
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model, "cpu").eval()
    method_cls = REGISTRY[recipe.method.name]
    result = {"stats": stats_needed(method_cls, recipe.method), "forward_peak": forward_peak(sampler, model)}
    if result["stats"]:
        result["stats_peak"] = stats_peak(sampler, model, tokenizer, recipe)
    start, cpu = time.perf_counter(), time.process_time()
    cal, _, result["calibrate_peak"] = sampler.measure(lambda: ensure_calibration(recipe, model, tokenizer, method_cls))
    result["calibrate_seconds"], result["calibrate_cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    result["calibration_disk"] = sum((cal.dir / f).stat().st_size for f in ("preserve_stats.safetensors", "task_stats.safetensors")
                                     if (cal.dir / f).exists())  # fmt: skip
    if calibration_only:
        out.write_text(json.dumps(result))
        return
    accelerator = make_accelerator(recipe)
    start, cpu = time.perf_counter(), time.process_time()
    (method, model, _), _, result["setup_peak"] = sampler.measure(lambda: setup_method(recipe, model, tokenizer, accelerator))
    result["setup_seconds"], result["setup_cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    result["setup_held"] = held_bytes(model, (ForaLinear, FoloraLinear))
    result.update(describe_bases(method))
    optimizer = method.build_optimizer(model, recipe.training)
    scheduler = build_scheduler(optimizer, recipe.training)
    ids = torch.randint(4, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    checkpoint = save_checkpoint(work / "run", TrainState(step=1), method, model, optimizer, scheduler, keep_last=1)
    result["checkpoint_disk"] = folder_bytes(checkpoint)
    result["checkpoint_files"] = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    out.write_text(json.dumps(result))


def describe_bases(method) -> dict:
    """FORA: k per distinct input and r_u / s per target (what the memory model needs)."""
    layers = getattr(method, "layers", None)
    if not layers:
        return {}
    ks, r_u, s = {}, {}, 0
    for name, layer in layers.items():
        ks[method.ctx.calibration.input_key(name)] = [layer.projector.rank, layer.right.shape[0]]
        r_u[name] = layer.u1.shape[1]
        s = layer.u_c.shape[1]
    return {"ks": ks, "r_u": r_u, "s": s}


def predict(shape_name: str, layers: int, method_key: str, measured: dict) -> dict:
    shape = SHAPES[shape_name]
    if method_key.startswith("stats:"):  # a statistics pass under a stats_memory_gb budget
        budget = None if measured["budget_gb"] == "none" else int(float(measured["budget_gb"]) * 1e9)
        passes, held, _ = mm.calibration_passes(shape, layers, budget)
        return {"stats_held": held, "stats_peak": held + measured["forward_peak"], "passes": passes}
    if method_key.startswith("init:"):  # init: gradient's set-up under a stats_memory_gb budget
        budget = None if measured["budget_gb"] == "none" else int(float(measured["budget_gb"]) * 1e9)
        passes, held = mm.gradient_init_passes(shape, layers, budget)
        transient = max(measured["backward_peak"], measured.get("svd_peak", 0))  # one after the other
        return {"init_peak": held + transient, "passes": passes}
    n_stats = len(measured["stats"])
    p = {"calibration_disk": mm.calibration_disk(shape, layers, n_stats)}
    if n_stats and "stats_peak" in measured:  # the forward's own activations: measured, not modelled
        p["stats_peak"] = mm.calibration_peak(shape, layers) + measured["forward_peak"]
    if method_key.startswith("fora"):
        ks = _per_input_ks(shape, layers, measured["ks"])
        short = {name.rsplit(".", 1)[-1]: r for name, r in measured["r_u"].items()}
        p["setup_held"] = sum(mm.fora_held(shape, 1, k, short, measured["s"]) for k in ks)
        p["setup_peak"] = p["setup_held"] + mm.fora_transient(shape)
        p["checkpoint_disk"] = mm.adapter_with_adam(shape, layers, 8, extra_rows=measured["s"])
    elif method_key == "folora":
        p["setup_held"] = mm.folora_held(shape, layers)
        p["setup_peak"] = p["setup_held"] + mm.folora_transient(shape)
        p["checkpoint_disk"] = mm.adapter_with_adam(shape, layers, 8)
    else:
        p["checkpoint_disk"] = mm.adapter_with_adam(shape, layers, 8)
    return p


def _per_input_ks(shape, layers: int, ks: dict) -> list[list[int]]:
    """The measured k of each distinct input, grouped per layer in :meth:`Shape.input_widths` order."""
    values = [k for k, _ in ks.values()]
    per = len(shape.input_widths())
    return [values[i * per : (i + 1) * per] for i in range(layers)]


def compare(predicted: dict, measured: dict) -> dict:
    rows = {}
    for key, value in predicted.items():
        got = measured.get(key)
        ratio = got / value if value else None
        rows[key] = {"predicted": value, "measured": got, "ratio": ratio,
                     "within_15pct": ratio is not None and abs(ratio - 1) <= 0.15}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory.json")
    parser.add_argument("--shapes", nargs="+", default=["qwen3-1.7b"])
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    parser.add_argument("--calibration-only", action="store_true", help="measure calibration only (no set-up)")
    parser.add_argument("--recompute", action="store_true", help="redo the comparisons in --out from its measurements")
    parser.add_argument("--stats-budgets", nargs="+", help="measure only the statistics pass at these stats_memory_gb (none: no limit)")
    parser.add_argument("--init-budgets", nargs="+",
                        help="measure only init: gradient's set-up at these stats_memory_gb")  # fmt: skip
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # MODEL_DIR METHOD OUT [CAL_ONLY]
    args = parser.parse_args()
    if args.worker and args.worker[1].startswith("init:"):
        init_budget_worker(Path(args.worker[0]), args.worker[1].split(":", 1)[1], Path(args.worker[2]))
        return
    if args.worker and args.worker[1].startswith("stats:"):
        stats_budget_worker(Path(args.worker[0]), args.worker[1].split(":", 1)[1], Path(args.worker[2]))
        return
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], Path(args.worker[2]), args.worker[3:] == ["1"])
        return
    if args.recompute:
        data = json.loads(args.out.read_text())
        for row in data["runs"]:
            row["comparison"] = compare(predict(row["shape"], row["layers"], row["method"], row["measured"]), row["measured"])
        args.out.write_text(json.dumps(data, indent=2))
        return
    import torch

    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__},
               "settings": {k: v for k, v in vars(args).items() if k != "worker"} | {"out": str(args.out)},
               "runs": []}  # fmt: skip
    if args.append and args.out.exists():
        results["runs"] = json.loads(args.out.read_text())["runs"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for shape_name in args.shapes:
        for layers in args.layers:
            with tempfile.TemporaryDirectory(prefix="ppft-mem-") as tmp:
                model_dir = build(shape_name, layers, Path(tmp) / "model")
                keys = ([f"stats:{b}" for b in args.stats_budgets] if args.stats_budgets else
                        [f"init:{b}" for b in args.init_budgets] if args.init_budgets else args.methods)  # fmt: skip
                for key in keys:
                    out = Path(tmp) / f"{key}.json"
                    flag = "1" if args.calibration_only else "0"
                    # init: every allocation of 64 KiB or more is mmapped and unmapped when freed, so RSS follows
                    # what is live (else glibc keeps freed SVD workspace and the backward's buffers resident)
                    worker_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"} if key.startswith("init:") else env
                    subprocess.run([sys.executable, __file__, "--worker", str(model_dir), key, str(out), flag],
                                   env=worker_env, check=True)  # fmt: skip
                    measured = json.loads(out.read_text())
                    row = {"shape": shape_name, "layers": layers, "method": key, "measured": measured,
                           "calibration_only": args.calibration_only,
                           "comparison": compare(predict(shape_name, layers, key, measured), measured)}  # fmt: skip
                    results["runs"].append(row)
                    print_row(row)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=2))  # after every run: partial results survive
    print(f"wrote {args.out}")


def print_row(row: dict) -> None:
    cells = [f"{k} {v['measured']}/{v['predicted']}" if k == "passes" else
             f"{k} {v['measured'] / 2**20:.1f}/{v['predicted'] / 2**20:.1f} MiB"
             for k, v in row["comparison"].items() if v["measured"] is not None]  # fmt: skip
    print(f"{row['shape']} L{row['layers']} {row['method']}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
