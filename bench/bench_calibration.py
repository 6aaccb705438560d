"""Calibration overhead, measured side by side on small random Llamas (no downloads).

1. Statistics: ``accumulate_input_stats`` over a set of token batches (probe pass, hooks, C_p
   accumulation for every distinct target input) vs a plain ``torch.no_grad`` forward over the same
   batches. Target: ratio <= 1.25.
2. Sampling: ``sample_preserve_texts`` (one batch, filter off) vs a bare ``model.generate`` with
   the same start batch and generation config. Target: throughput ratio >= 0.8.

Each pair is timed alternately (ours, baseline, ours, ...) and the median of per-round ratios is
reported, which is robust to other load on the machine.

    python bench/bench_calibration.py --out bench/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "h256-L4-v32k": (256, 688, 4, 4, 4, 32000),
    "h256-L4-v1k": (256, 688, 4, 4, 4, 1024),
}
REAL_SHAPES = {"qwen3-1.7b-L1": ("qwen3-1.7b", 1)}  # bench/realshape.py: real widths, lab vocabulary


def build(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(ours, baseline, rounds: int) -> dict:
    """Alternate the two, ``rounds`` times each after one warm-up; median times and ratio."""
    ours(), baseline()
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(ours))
        b.append(timed(baseline))
    return {
        "ours_s": statistics.median(a),
        "baseline_s": statistics.median(b),
        "ratio_median": statistics.median(x / y for x, y in zip(a, b, strict=True)),
        "ours_raw_s": [round(x, 4) for x in a],
        "baseline_raw_s": [round(y, 4) for y in b],
    }


def bench_stats(model, seqs: int, length: int, batch: int, rounds: int, blocks: int | None = None) -> dict:
    from preserve_core.calibration.stats import accumulate_input_stats
    from preserve_core.models import resolve_target_modules

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [
        {"input_ids": (ids := torch.randint(4, vocab, (batch, length), generator=g)), "attention_mask": torch.ones_like(ids)}
        for _ in range(seqs // batch)
    ]
    targets = resolve_target_modules(model, None)

    def ours():
        from preserve_core.calibration import stats

        default = stats.MAX_GRAM_BLOCKS
        if blocks is not None:  # the same block count for every width
            stats.MAX_GRAM_BLOCKS, stats.GRAM_BLOCK_ROWS = blocks, 1
        try:
            accumulate_input_stats(model, targets, batches, positions="all")
        finally:
            stats.MAX_GRAM_BLOCKS, stats.GRAM_BLOCK_ROWS = default, 512

    def baseline():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    result = paired(ours, baseline, rounds)
    tokens = seqs // batch * batch * length
    return {**result, "tokens": tokens, "target": "ratio <= 1.25", "meets_target": result["ratio_median"] <= 1.25}


def bench_sampling(model, tokenizer, batch: int, new_tokens: int, rounds: int) -> dict:
    from preserve_core.calibration.sampling import generation_config, sample_preserve_texts
    from preserve_core.recipe_schema import CalibrationConfig

    cfg = CalibrationConfig(num_samples=batch, batch_size=batch, max_new_tokens=new_tokens, min_new_tokens=0,
                            max_repeat_fraction=1.0)
    gen_cfg = generation_config(model, tokenizer, cfg)
    gen_cfg.eos_token_id = None  # the baseline must make as many tokens as we do: never stop early
    starts = torch.full((batch, 1), tokenizer.bos_token_id)
    counted = {}

    def ours():
        samples, _ = sample_preserve_texts(model, tokenizer, cfg)
        counted["ours"] = sum(s.n_new for s in samples)

    def baseline():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(input_ids=starts, attention_mask=torch.ones_like(starts), generation_config=gen_cfg)
        counted["baseline"] = (out.shape[1] - 1) * batch

    result = paired(ours, baseline, rounds)
    # throughput ratio: (our tokens / our time) / (baseline tokens / baseline time)
    scale = counted["ours"] / counted["baseline"]
    ratio = scale / result["ratio_median"]
    return {
        **result, "tokens_ours": counted["ours"],
        "tokens_baseline": counted["baseline"], "throughput_ratio": ratio, "target": "throughput ratio >= 0.8",
        "meets_target": ratio >= 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibration.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seqs", type=int, default=32, help="sequences for the statistics")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward")
    parser.add_argument("--samples", type=int, default=16, help="samples (one generate batch)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--real", action="store_true", help="also the real-width configs (REAL_SHAPES); slow on a CPU")
    parser.add_argument("--real-rounds", type=int, default=3)
    parser.add_argument("--real-only", action="store_true", help="only the real-width configs; keeps the file's others")
    parser.add_argument("--real-seqs", type=int, default=8, help="sequences for the statistics at real width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); 1 is steadier on a shared box")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
               "settings": vars(args) | {"out": str(args.out)}, "configs": {}}
    if args.real_only and args.out.exists():
        results["configs"] = json.loads(args.out.read_text()).get("configs", {})
    for name, shape in ({} if args.real_only else CONFIGS).items():
        model, tokenizer = build(*shape)
        results["configs"][name] = {
            "shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"), shape, strict=True)),
            "stats": bench_stats(model, args.seqs, args.length, args.batch, args.rounds),
            "sampling": bench_sampling(model, tokenizer, args.samples, args.new_tokens, args.rounds),
        }
        print_row(name, results["configs"][name])
    if args.real or args.real_only:
        results["real_widths"] = bench_real(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def bench_real(args) -> dict:
    """Statistics vs forward at real widths (1 layer), with the adaptive Gram blocks and with 4 and 1."""
    sys.path.insert(0, str(REPO / "bench"))
    from realshape import make

    out = {}
    for name, (shape, layers) in REAL_SHAPES.items():
        model, _ = make(shape, layers)
        out[name] = {"shape": shape, "layers": layers}
        for label, blocks in (("adaptive", None), ("blocks4", 4)):
            r = bench_stats(model, args.real_seqs, args.length, args.batch // 2, args.real_rounds, blocks)
            r["target"], r["meets_target"] = "ratio <= 1.1 (issue 15)", r["ratio_median"] <= 1.1
            out[name][label] = r
            print(f"{name} statistics ({label}): {r['ratio_median']:.2f}x a no-grad forward ({r['tokens']} tokens)", flush=True)
        del model
    return out


def print_row(name: str, r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s, g = r["stats"], r["sampling"]
    table = Table(title=f"{name}: {s['tokens']} tokens for statistics, {g['tokens_ours']} sampled tokens")
    for column in ("measure", "ppft (s)", "baseline (s)", "ratio", "target", "met"):
        table.add_column(column)
    table.add_row("statistics vs no-grad forward", f"{s['ours_s']:.3f}", f"{s['baseline_s']:.3f}",
                  f"{s['ratio_median']:.2f}x time", "<= 1.25x", str(s["meets_target"]))
    table.add_row("sampling vs bare generate", f"{g['ours_s']:.3f}", f"{g['baseline_s']:.3f}",
                  f"{g['throughput_ratio']:.2f}x tokens/s", ">= 0.8x", str(g["meets_target"]))
    Console().print(table)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO))
    main()
