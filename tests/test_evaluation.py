"""``ppft eval`` and ``evaluate_suite``: each task kind against a hand computation, the CLI gate, the base cache.

The model is a tiny random Llama with a character tokenizer built here (its decoder joins
characters without spaces and it adds bos like Llama tokenizers do), so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import string
from pathlib import Path

import pytest
import torch
import yaml

from preserve_core.errors import RecipeError
from preserve_core.evaluation import evaluate_suite, retention_metrics, run_eval
from preserve_core.evaluation import runner as runner_module
from preserve_core.evaluation.generation import greedy_generate
from preserve_core.evaluation.rows import encode_prompt
from preserve_core.evaluation.tasks import normalize_text, run_task
from preserve_core.recipe import load_recipe
from preserve_core.recipe_schema import EvalTask

PROMPTS = ["12+3=", "a", "hello wor", "7*8=", "the quick brown fox ", "xy", "rev:abc=", "q"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny model folder, data files, recipes
# ---------------------------------------------------------------------------------------------
def char_tokenizer():
    """Characters as tokens; ``tokenizer(text)`` adds bos; ``decode`` concatenates characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )  # fmt: skip


def tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: peaked distributions, so greedy argmax has no near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, model, tok) -> Path:
    return save_model(model, tok, tmp_path_factory.mktemp("base"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def naive_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop: str = "\n") -> str:
    """Reference decoding: one prompt, no padding, no KV cache, full forward pass per token."""
    ids = encode_prompt(tokenizer, prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text.split(stop)[0] if stop else text


def em_task(name: str, data: str, **kw) -> EvalTask:
    return EvalTask(name=name, kind="exact_match", data=data, max_new_tokens=kw.pop("max_new_tokens", 8), **kw)


@pytest.fixture(scope="module")
def references(model, tok) -> list[str]:
    return [naive_greedy(model, tok, p, 8) for p in PROMPTS]


@pytest.fixture(scope="module")
def em_file(tmp_path_factory, references) -> str:
    """Completions equal the model's own greedy output on even rows, something else on odd rows."""
    rows = [
        {"prompt": p, "completion": r if i % 2 == 0 else r + "#"} for i, (p, r) in enumerate(zip(PROMPTS, references))
    ]
    return write_jsonl(tmp_path_factory.mktemp("em") / "em.jsonl", rows)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    rows = [{"text": t} for t in ["hello there", "a", "the cat sat on the mat", "0123456789"]]
    return write_jsonl(tmp_path_factory.mktemp("ppl") / "text.jsonl", rows)


# ---------------------------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------------------------
def test_batched_generation_equals_unbatched_naive_greedy(model, tok, references):
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) > 3  # different lengths: batches really are padded
    for batch_size in (1, 3, len(PROMPTS)):
        assert greedy_generate(model, tok, prompt_ids, 8, ["\n"], batch_size) == references
    assert sum(len(r) > 0 for r in references) >= 6  # the references are not trivially empty


def test_exact_match_score_and_samples(model, tok, em_file, references):
    for batch_size in (1, 5):
        result = run_task(model, tok, em_task("em", em_file), batch_size)
        assert result.score == pytest.approx(0.5)
        assert [s["correct"] for s in result.samples] == [i % 2 == 0 for i in range(len(PROMPTS))]
        assert [s["prediction"] for s in result.samples] == references
        assert result.stderr == pytest.approx(math.sqrt(0.25 / len(PROMPTS)))


def test_normalisation_steps():
    assert normalize_text("  Hello,   World! \n", ["strip"]) == "Hello,   World!"
    assert normalize_text("  Hello,   World! ", ["lower", "collapse_whitespace", "strip_punctuation"]) == "hello world"


# ---------------------------------------------------------------------------------------------
# perplexity, multiple_choice, kl_to_base
# ---------------------------------------------------------------------------------------------
def sequence_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded sequence."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_perplexity_matches_hand_computation(model, tok, text_file):
    texts = [json.loads(line)["text"] for line in Path(text_file).read_text().splitlines()]
    nll = torch.cat(
        [
            -sequence_logprobs(
                model, [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            )
            for t in texts
        ]
    )
    expected = math.exp(float(nll.sum()) / nll.numel())
    result = run_task(model, tok, EvalTask(name="ppl", kind="perplexity", data=text_file), batch_size=3)
    assert result.score == pytest.approx(expected, rel=1e-5)
    assert result.n == sum(len(t) + 1 for t in texts)  # every character and eos; bos is never predicted
    assert not result.higher_is_better


def test_perplexity_of_completions_scores_only_the_completion(model, tok, tmp_path):
    data = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "ab=", "completion": "xyz"}, {"prompt": "q", "completion": "r"}]
    )
    expected_nll = []
    for prompt, completion in [("ab=", "xyz"), ("q", "r")]:
        ids = [tok.bos_token_id] + tok(prompt + completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected_nll.append(-sequence_logprobs(model, ids)[len(prompt) :])
    nll = torch.cat(expected_nll)
    result = run_task(model, tok, EvalTask(name="ppl", kind="perplexity", data=data), batch_size=2)
    assert result.n == 4 + 2
    assert result.score == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_multiple_choice_acc_and_acc_norm(model, tok, tmp_path):
    rows, expected, expected_norm = [], [], []
    for i, (prompt, choices) in enumerate(
        [("1+1=", ["2", "11", "x"]), ("ab", ["c", "cd"]), ("z", ["q", "rr", "sss"]), ("k", ["k", "m"])]
    ):
        head = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        sums = [
            float(sequence_logprobs(model, head + tok(c, add_special_tokens=False)["input_ids"])[len(head) - 1 :].sum())
            for c in choices
        ]
        best = max(range(len(choices)), key=sums.__getitem__)
        best_norm = max(range(len(choices)), key=lambda j: sums[j] / len(choices[j]))
        answer = best if i % 2 == 0 else (best + 1) % len(choices)
        rows.append({"prompt": prompt, "choices": choices, "answer": answer})
        expected.append(best == answer)
        expected_norm.append(best_norm == answer)
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    result = run_task(model, tok, EvalTask(name="mc", kind="multiple_choice", data=data), batch_size=4)
    assert result.score == pytest.approx(sum(expected) / 4) and result.score == pytest.approx(0.5)
    assert result.extra["acc_norm"] == pytest.approx(sum(expected_norm) / 4)


def test_kl_to_base_is_zero_for_identical_models_and_positive_otherwise(model, tok, text_file):
    task = EvalTask(name="kl", kind="kl_to_base", data=text_file)
    same = run_task(model, tok, task, 2, base_model=copy.deepcopy(model))
    assert same.score == pytest.approx(0.0, abs=1e-6) and same.n > 0
    other = tiny_llama(len(tok), seed=1)
    assert run_task(other, tok, task, 2, base_model=model).score > 0.01


def test_kl_to_base_of_a_peft_model_uses_the_disabled_adapter(model, tok, text_file):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    task = EvalTask(name="kl", kind="kl_to_base", data=text_file)
    assert run_task(peft_model, tok, task, 4).score == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert run_task(peft_model, tok, task, 4).score > 1e-4


def test_lab_data_refs_read_the_skills_eval_split(model, tok, em_file, monkeypatch):
    import preserve_core.lab

    asked = []

    def fake_resolve(ref: str, split: str, size: str = "tiny") -> str:
        asked.append((ref, split))
        return em_file

    monkeypatch.setattr(preserve_core.lab, "resolve_data_ref", fake_resolve, raising=False)
    result = run_task(model, tok, em_task("lab_em", "lab:arith"), batch_size=4)
    assert asked == [("lab:arith", "eval")] and result.score == pytest.approx(0.5)


def test_evaluate_suite_restores_training_mode_and_reports_retention(model, tok, em_file, text_file):
    trained = copy.deepcopy(model).train()
    tasks = [em_task("em", em_file), EvalTask(name="ppl", kind="perplexity", data=text_file)]
    base = evaluate_suite(model, tok, tasks, batch_size=4)
    again = evaluate_suite(trained, tok, tasks, batch_size=4)
    assert trained.training
    metrics = retention_metrics(base, again)
    assert metrics["retention/em"] == pytest.approx(1.0) and metrics["retention/ppl"] == pytest.approx(1.0)
    assert metrics["retention/mean"] == pytest.approx(1.0) and metrics["preserve/em"] == pytest.approx(0.5)
    with pytest.raises(RecipeError, match="unique"):
        evaluate_suite(model, tok, [tasks[0], tasks[0]], batch_size=4)


# ---------------------------------------------------------------------------------------------
# run_eval, the base cache, the CLI and its exit codes
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preserve_file(tmp_path_factory, references) -> str:
    """The base model gets every row right: any change of its greedy outputs is a regression."""
    rows = [{"prompt": p, "completion": r} for p, r in zip(PROMPTS, references)]
    return write_jsonl(tmp_path_factory.mktemp("keep") / "keep.jsonl", rows)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tok) -> Path:
    return save_model(tiny_llama(len(tok), seed=1), tok, tmp_path_factory.mktemp("other"))


@pytest.fixture
def recipe_path(tmp_path, base_dir, em_file, preserve_file, text_file, monkeypatch) -> Path:
    monkeypatch.delenv("PPFT_HOME", raising=False)
    recipe = {
        "model": {"name_or_path": str(base_dir)},
        "data": {"train": em_file},
        "method": {"name": "full"},
        "eval": {
            "batch_size": 4,
            "target": [{"name": "new", "kind": "exact_match", "data": em_file, "max_new_tokens": 8}],
            "preserve": [
                {"name": "keep", "kind": "exact_match", "data": preserve_file, "max_new_tokens": 8},
                {"name": "ppl", "kind": "perplexity", "data": text_file},
                {"name": "kl", "kind": "kl_to_base", "data": text_file},
            ],
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli_app():
    import typer

    from cli.eval import eval_cmd

    try:
        from cli.main import app

        if any(c.name == "eval" for c in app.registered_commands):
            return app
    except ImportError:
        pass
    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.callback()(lambda: None)
    return app


def invoke(*args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(cli_app(), ["eval", *args])


def test_cli_identical_model_passes_the_gate(recipe_path, base_dir):
    result = invoke(str(recipe_path), "--checkpoint", str(base_dir), "--fail-on-regression", "0.5")
    assert result.exit_code == 0, result.output
    report = json.loads((recipe_path.parent / "run" / "eval" / "report.json").read_text())
    by_name = {t["name"]: t for t in report["tasks"]}
    assert by_name["keep"]["base"] == 1.0 and by_name["keep"]["retention"] == pytest.approx(1.0)
    assert by_name["kl"]["tuned"] == pytest.approx(0.0, abs=1e-6) and by_name["kl"]["retention"] is None
    assert report["summary"]["passed"] and report["summary"]["new_task_gain_points"] == pytest.approx(0.0)
    assert "| preserve | keep |" in (recipe_path.parent / "run" / "eval" / "report.md").read_text()


def test_cli_regression_exits_3_and_names_the_task(recipe_path, other_dir):
    result = invoke(str(recipe_path), "--checkpoint", str(other_dir), "--fail-on-regression", "5")
    assert result.exit_code == 3, result.output
    assert "regression" in result.output and "keep" in result.output
    report = json.loads((recipe_path.parent / "run" / "eval" / "report.json").read_text())
    assert "keep" in report["summary"]["regressions"] and not report["summary"]["passed"]
    # without a gate the same comparison is only reported; the recipe's gate applies when the CLI gives none
    assert invoke(str(recipe_path), "--checkpoint", str(other_dir)).exit_code == 0
    assert invoke(str(recipe_path), "--checkpoint", str(other_dir), "--set", "eval.fail_on_regression=5").exit_code == 3


def test_cli_missing_checkpoint_is_bad_input(recipe_path):
    result = invoke(str(recipe_path))
    assert result.exit_code == 2
    assert "ppft train" in result.output


def test_base_results_are_cached_across_checkpoints(recipe_path, base_dir, other_dir, monkeypatch):
    evaluated: list[list[str]] = []
    real = runner_module.evaluate_suite

    def counting(model, tokenizer, tasks, *args, **kwargs):
        evaluated.append([t.name for t in tasks])
        return real(model, tokenizer, tasks, *args, **kwargs)

    monkeypatch.setattr(runner_module, "evaluate_suite", counting)
    recipe = load_recipe(recipe_path)
    first = run_eval(recipe, checkpoint=base_dir)
    assert evaluated == [["new", "keep", "ppl"], ["new", "keep", "ppl", "kl"]]  # base (kl is 0 by definition), tuned
    second = run_eval(recipe, checkpoint=other_dir)
    assert evaluated[2:] == [["new", "keep", "ppl", "kl"]]  # the tuned model only
    assert all(t.base_cached for t in second.tasks if t.kind != "kl_to_base")
    assert [t.base for t in first.tasks] == [t.base for t in second.tasks]
    assert list((recipe_path.parent / "run" / "eval" / "cache").glob("*.json"))
    monkeypatch.setenv("PPFT_HOME", str(recipe_path.parent / "home"))  # a shared cache, empty so far
    run_eval(recipe, checkpoint=other_dir)
    assert (
        evaluated[3] == ["new", "keep", "ppl"]
        and len(list((recipe_path.parent / "home" / "eval_cache").glob("*.json"))) == 3
    )


def test_adapter_checkpoint_is_loaded_on_the_base(recipe_path, model, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = run_eval(load_recipe(recipe_path), checkpoint=tmp_path / "adapter")
    assert report.checkpoint_kind == "adapter"
    assert {t.name: t for t in report.tasks}["kl"].tuned > 1e-4


# ---------------------------------------------------------------------------------------------
# lm-eval (optional extra)
# ---------------------------------------------------------------------------------------------
LM_EVAL_TASK = """\
task: ppft_em_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_exact_match_equals_lm_eval_on_the_same_local_suite(model, tok, em_file, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    (tmp_path / "ppft_em_local.yaml").write_text(LM_EVAL_TASK.format(data=em_file))
    ours = run_task(model, tok, em_task("em", em_file, normalize=[]), batch_size=3)
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=3), tasks=["ppft_em_local"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
    )  # fmt: skip
    generations = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in theirs["samples"]["ppft_em_local"]}
    assert [generations[p] for p in PROMPTS] == [s["prediction"] for s in ours.samples]
    assert theirs["results"]["ppft_em_local"]["exact_match,none"] == pytest.approx(ours.score) == pytest.approx(0.5)
    # the same suite through ppft's lm_eval task kind
    wrapped = EvalTask(name="lm", kind="lm_eval", lm_eval_tasks=["ppft_em_local"], lm_eval_include_path=str(tmp_path))
    result = run_task(model, tok, wrapped, batch_size=3)
    assert result.score == pytest.approx(0.5) and result.unit == "fraction" and result.n == len(PROMPTS)


def test_lm_eval_kind_without_lm_eval_says_how_to_install(model, tok, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    task = EvalTask(name="lm", kind="lm_eval", lm_eval_tasks=["anything"])
    with pytest.raises(RecipeError, match=r"pip install 'ppft\[lmeval\]'"):
        run_task(model, tok, task, batch_size=2)


def test_lm_eval_sees_the_lab_prompts_with_one_bos_as_ppft_does():
    """lm-eval tokenizes with the tokenizer's own special tokens: the lab's post-processor adds ``<s>`` once,
    giving exactly ppft's ``[bos] + prompt`` (for a single prompt, a batch and a context/continuation pair)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from preserve_core.evaluation.rows import encode_plain, encode_prompt
    from preserve_core.lab.tokenizer import build_tokenizer
    from tests.conftest import build_tiny_llama

    tok = build_tokenizer()
    lm = HFLM(pretrained=build_tiny_llama(len(tok)), tokenizer=tok, batch_size=2)
    assert lm.tok_encode("rev:abc=") == encode_prompt(tok, "rev:abc=") == [1, *encode_plain(tok, "rev:abc=")]
    assert lm.tok_batch_encode(["rev:abc="])[0].tolist() == [encode_prompt(tok, "rev:abc=")]
    assert lm._encode_pair("rev:abc=", "cba") == (encode_prompt(tok, "rev:abc="), encode_plain(tok, "cba"))
