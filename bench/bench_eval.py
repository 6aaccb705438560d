"""Exact-match evaluation wall time: ppft's ``exact_match`` versus lm-evaluation-harness on the same suite.

Same random-init Llama (character tokenizer), same rows, batch size, greedy decoding, stop string
and generation budget, measured side by side in one process with interleaved repeats. ppft is timed
cold (encoded-data cache cleared: reads and tokenizes the file) and warm (cache kept, as during
training); lm-eval is timed for ``HFLM`` + ``simple_evaluate`` on a local YAML task. Both must
produce the same generations. The ratio is ppft / lm-eval (target <= 1.0) on the best of the
repeats, since the machine may be shared; medians are recorded too.

    python bench/bench_eval.py --out bench/results/eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, interleaved, write_result
from test_evaluation import LM_EVAL_TASK, char_tokenizer

from preserve_core.evaluation.generation import greedy_generate
from preserve_core.evaluation.rows import clear_encoding_cache, encode_prompt
from preserve_core.evaluation.tasks import run_task
from preserve_core.recipe_schema import EvalTask


def build_model(vocab_size: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_suite(root: Path, n_rows: int, max_new_tokens: int) -> tuple[str, Path]:
    """Arithmetic prompts of varied length; returns the JSONL path and the lm-eval include folder."""
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        a, b = rng.randrange(10 ** rng.randint(1, 6)), rng.randrange(10 ** rng.randint(1, 6))
        rows.append({"prompt": f"Q: what is {a} + {b}?\nA: ", "completion": str(a + b)})
    data = root / "suite.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    include = root / "lm_tasks"
    include.mkdir()
    yaml_text = LM_EVAL_TASK.format(data=data).replace("max_gen_toks: 8", f"max_gen_toks: {max_new_tokens}")
    (include / "ppft_em_local.yaml").write_text(yaml_text)
    return str(data), include


def time_ppft(model, tokenizer, task: EvalTask, batch_size: int, cold: bool):
    if cold:
        clear_encoding_cache()
    start = time.perf_counter()
    result = run_task(model, tokenizer, task, batch_size)
    return time.perf_counter() - start, result


def time_lm_eval(model, tokenizer, include: Path, batch_size: int, limit: int | None):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=["ppft_em_local"],
        task_manager=TaskManager(include_path=str(include), include_defaults=False), log_samples=True, limit=limit,
    )  # fmt: skip
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval.json")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import lm_eval  # noqa: F401  (imported before timing: import cost is not part of the comparison)

    tokenizer = char_tokenizer()
    model = build_model(len(tokenizer), args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        data, include = write_suite(Path(tmp), args.rows, args.max_new_tokens)
        task = EvalTask(
            name="em", kind="exact_match", data=data, max_new_tokens=args.max_new_tokens, stop=["\n"], normalize=[]
        )
        time_ppft(model, tokenizer, task.model_copy(update={"limit": 4}), args.batch_size, cold=True)  # warm-up
        time_lm_eval(model, tokenizer, include, args.batch_size, limit=4)
        runs = interleaved({  # each (seconds, result)
            "cold": lambda: time_ppft(model, tokenizer, task, args.batch_size, cold=True),
            "warm": lambda: time_ppft(model, tokenizer, task, args.batch_size, cold=False),
            "lm_eval": lambda: time_lm_eval(model, tokenizer, include, args.batch_size, limit=None),
        }, args.repeats)  # fmt: skip
        cold, warm, theirs = ([seconds for seconds, _ in runs[k]] for k in ("cold", "warm", "lm_eval"))
        ours, out = runs["cold"][-1][1], runs["lm_eval"][-1][1]
        prompts = [json.loads(line)["prompt"] for line in Path(data).read_text().splitlines()]
        our_gens = greedy_generate(
            model,
            tokenizer,
            [encode_prompt(tokenizer, p) for p in prompts],
            args.max_new_tokens,
            ["\n"],
            args.batch_size,
        )
    their_score = float(out["results"]["ppft_em_local"]["exact_match,none"])
    their_gens = [s["filtered_resps"][0] for s in sorted(out["samples"]["ppft_em_local"], key=lambda s: s["doc_id"])]
    result = {
        "suite": {"rows": args.rows, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "stop": ["\n"]},
        "model": {"arch": "llama (random init)", "hidden": args.hidden, "layers": args.layers, "vocab": len(tokenizer),
                  "params": sum(p.numel() for p in model.parameters())},
        "statistic": "best of repeats (min); medians alongside (the machine is shared, so outliers are contention)",
        "ppft_cold_s": min(cold), "ppft_warm_s": min(warm), "lm_eval_s": min(theirs),
        "ratio_cold": min(cold) / min(theirs), "ratio_warm": min(warm) / min(theirs),
        "median_ratio_cold": statistics.median(cold) / statistics.median(theirs),
        "all_runs": {"ppft_cold_s": cold, "ppft_warm_s": warm, "lm_eval_s": theirs},
        "scores": {"ppft": ours.score, "lm_eval": their_score},
        "generations_identical": our_gens == their_gens,
        "rows_ending_before_budget": sum(len(g) < args.max_new_tokens for g in our_gens),
        "env": {"python": platform.python_version(), "torch": torch.__version__, "lm_eval": _version("lm_eval"),
                "threads": torch.get_num_threads(), "device": "cpu"},
    }  # fmt: skip
    write_result(args.out, result, {k: result[k] for k in ("ppft_cold_s", "ppft_warm_s", "lm_eval_s", "ratio_cold", "ratio_warm", "scores")})


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name.replace("_", "-"))


if __name__ == "__main__":
    main()
