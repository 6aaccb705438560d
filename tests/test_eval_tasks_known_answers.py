"""Each eval task kind (``preserve_core.evaluation.tasks``) against a hand computation in float64.

The model is a bigram table: the logits at position t are ``table[x_t]``, so
``log p(x_t | x_<t) = log_softmax(table[x_{t-1}])[x_t]`` and every score below is a short sum
over that table, written out from the task's definition (not by calling the code under test).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from preserve_core.errors import RecipeError
from preserve_core.evaluation import lmeval, tasks
from preserve_core.evaluation.rows import clear_encoding_cache
from preserve_core.evaluation.tasks import (
    MAX_SAMPLES,
    _fit,
    _truncate_right,
    model_max_length,
    normalize_text,
    run_exact_match,
    run_kl_to_base,
    run_multiple_choice,
    run_perplexity,
    run_task,
)
from preserve_core.recipe_schema import EvalTask
from tests.conftest import build_char_tokenizer

TOK = build_char_tokenizer()  # <pad>=0, <bos>=1, <eos>=2, one id per character; adds no special tokens itself
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
V = len(TOK)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


class Bigram(torch.nn.Module):
    """``logits[b, t] = table[input_ids[b, t]]``: the next token depends on the current one only."""

    def __init__(self, table: torch.Tensor, max_len: int | None = None):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=max_len)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def random_table(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * scale


def logp(table: torch.Tensor, prev: int, token: int) -> float:
    return float(torch.log_softmax(table[prev].double(), -1)[token])


def seq_logp(table: torch.Tensor, seq: list[int], start: int) -> float:
    """sum_{t >= start} log p(seq[t] | seq[t-1])."""
    return sum(logp(table, seq[t - 1], seq[t]) for t in range(start, len(seq)))


def write_rows(tmp_path, rows: list[dict], name: str = "rows.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_encodings():
    clear_encoding_cache()
    yield
    clear_encoding_cache()


# ---------------------------------------------------------------------------------------------
# normalize_text, model_max_length, _fit, _truncate_right
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], " A,  b\tC. "),
        (["strip"], "A,  b\tC."),
        (["lower"], " a,  b\tc. "),
        (["collapse_whitespace"], "A, b C."),
        (["strip_punctuation"], " A  b\tC "),
        (["strip_punctuation", "collapse_whitespace", "lower"], "a b c"),
    ],
)
def test_normalize_text_each_step(steps, expected):
    assert normalize_text(" A,  b\tC. ", steps) == expected


def test_model_max_length_reads_the_config():
    assert model_max_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=7))) == 7
    assert model_max_length(SimpleNamespace(config=SimpleNamespace())) is None
    assert model_max_length(SimpleNamespace()) is None


def limited(n: int | None) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n))


def test_fit_left_truncates_and_moves_the_scored_start():
    """Limit 4: a 6-token item loses 2 tokens on the left, so its start moves 2 back (at least 1)."""
    a6, a7 = [10, 11, 12, 13, 14, 15], [10, 11, 12, 13, 14, 15, 16]
    items = [([10, 11, 12, 13], 0), (a6, 3), (a6, 5), (a7, 2), ([10, 11], 1)]
    assert _fit(items, limited(4)) == [
        ([10, 11, 12, 13], 0),  # exactly at the limit: untouched
        ([12, 13, 14, 15], 1),
        ([12, 13, 14, 15], 3),
        ([13, 14, 15, 16], 1),  # 2 - 3 < 1: floored at 1 (position 0 has no prediction)
        ([10, 11], 1),
    ]
    assert _fit(items, limited(None)) == items and _fit(items, SimpleNamespace()) == items


def test_truncate_right_keeps_the_head():
    items = [([10, 11, 12, 13, 14, 15], 2), ([10, 11], 1)]
    assert _truncate_right(items, limited(4)) == [([10, 11, 12, 13], 2), ([10, 11], 1)]
    assert _truncate_right(items, limited(None)) == items


# ---------------------------------------------------------------------------------------------
# exact_match (generation is faked: what the task hands to it and how it scores the answers)
# ---------------------------------------------------------------------------------------------
def fake_generation(monkeypatch, predictions: list[str]) -> dict:
    seen = {}

    def generate(model, tokenizer, prompt_ids, max_new_tokens, stop, batch_size):
        seen.update(model=model, tokenizer=tokenizer, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                    stop=stop, batch_size=batch_size)  # fmt: skip
        return predictions[: len(prompt_ids)]

    monkeypatch.setattr(tasks, "greedy_generate", generate)
    return seen


def test_exact_match_scores_normalised_answers(monkeypatch, tmp_path):
    rows = [{"prompt": "ab", "completion": "  Yes"}, {"prompt": "c", "completion": "no"},
            {"prompt": "de", "completion": "x"}, {"prompt": "f", "completion": "q"}]  # fmt: skip
    seen = fake_generation(monkeypatch, ["yes ", "NO", "x", "z"])
    task = EvalTask(name="em", kind="exact_match", data=write_rows(tmp_path, rows), max_new_tokens=3,
                    stop=["\n", "."], normalize=["strip", "lower"])  # fmt: skip
    model = limited(None)
    r = run_exact_match(model, TOK, task, batch_size=5)
    assert seen == {"model": model, "tokenizer": TOK, "max_new_tokens": 3, "stop": ["\n", "."], "batch_size": 5,
                    "prompt_ids": [[BOS, *ids("ab")], [BOS, *ids("c")], [BOS, *ids("de")], [BOS, *ids("f")]]}  # fmt: skip
    assert (r.name, r.kind, r.metric, r.n, r.unit, r.higher_is_better) == ("em", "exact_match", "exact_match", 4,
                                                                           "fraction", True)  # fmt: skip
    assert r.score == 0.75 and r.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert r.samples == [
        {"prompt": "ab", "prediction": "yes ", "reference": "  Yes", "correct": True},
        {"prompt": "c", "prediction": "NO", "reference": "no", "correct": True},
        {"prompt": "de", "prediction": "x", "reference": "x", "correct": True},
        {"prompt": "f", "prediction": "z", "reference": "q", "correct": False},
    ]


def test_exact_match_keeps_the_prompts_tail_that_fits(monkeypatch, tmp_path):
    """Context 6 and 2 new tokens: a prompt keeps its last 4 tokens; context 3 and 4 new tokens: 1 (the floor)."""
    data = write_rows(tmp_path, [{"prompt": "abcdefg", "completion": "x"}, {"prompt": "a", "completion": "y"}])
    seen = fake_generation(monkeypatch, ["x", "n"])
    r = run_exact_match(limited(6), TOK, EvalTask(name="em", kind="exact_match", data=data, max_new_tokens=2), 2)
    assert seen["prompt_ids"] == [ids("defg"), [BOS, *ids("a")]] and r.score == 0.5
    run_exact_match(limited(3), TOK, EvalTask(name="em", kind="exact_match", data=data, max_new_tokens=4), 2)
    assert seen["prompt_ids"] == [ids("g"), ids("a")]


def test_exact_match_keeps_at_most_max_samples(monkeypatch, tmp_path):
    rows = [{"prompt": f"{i}", "completion": "a"} for i in range(MAX_SAMPLES + 1)]
    fake_generation(monkeypatch, ["a"] * (MAX_SAMPLES + 1))
    r = run_exact_match(limited(None), TOK, EvalTask(name="em", kind="exact_match", data=write_rows(tmp_path, rows)), 8)
    assert MAX_SAMPLES == 20 and len(r.samples) == 20 and r.n == 21 and r.score == 1.0 and r.stderr == 0.0
    assert [s["prompt"] for s in r.samples] == [str(i) for i in range(20)]


def test_exact_match_needs_prompt_and_completion(tmp_path):
    task = EvalTask(name="em", kind="exact_match", data=write_rows(tmp_path, [{"prompt": "a"}]))
    with pytest.raises(RecipeError, match=r"rows need column\(s\) \['completion'\]"):
        run_exact_match(limited(None), TOK, task, 2)


# ---------------------------------------------------------------------------------------------
# multiple_choice
# ---------------------------------------------------------------------------------------------
MC_ROWS = [("ab", ["c", "ddd"]), ("x", ["yz", "q", "rst"]), ("k", ["mn", "n"]), ("e", ["ff", "g"])]


def mc_expected(table, rows):
    """Per row: argmax of sum log p(choice) and of that sum / len(choice in characters)."""
    raw_best, norm_best = [], []
    for prompt, choices in rows:
        head = [BOS, *ids(prompt)]
        sums = [seq_logp(table, head + ids(c), len(head)) for c in choices]
        raw_best.append(max(range(len(choices)), key=sums.__getitem__))
        norm_best.append(max(range(len(choices)), key=lambda j: sums[j] / len(choices[j])))
    return raw_best, norm_best


def test_multiple_choice_acc_and_acc_norm_by_hand(tmp_path):
    table = random_table(3)
    raw_best, norm_best = mc_expected(table, MC_ROWS)
    assert raw_best != norm_best  # the data tells acc from acc_norm
    answers = [raw_best[0], norm_best[1], raw_best[2], raw_best[3]]
    acc = sum(b == a for b, a in zip(raw_best, answers)) / 4
    acc_norm = sum(b == a for b, a in zip(norm_best, answers)) / 4
    assert acc != acc_norm
    rows = [{"prompt": p, "choices": c, "answer": a} for (p, c), a in zip(MC_ROWS, answers)]
    r = run_multiple_choice(Bigram(table), TOK, EvalTask(name="mc", kind="multiple_choice", data=write_rows(tmp_path, rows)), 2)
    assert (r.name, r.kind, r.metric, r.n, r.unit, r.higher_is_better) == ("mc", "multiple_choice", "acc", 4,
                                                                           "fraction", True)  # fmt: skip
    assert r.score == acc and r.stderr == pytest.approx(math.sqrt(acc * (1 - acc) / 4))
    assert r.extra == {"acc_norm": acc_norm, "acc_norm_stderr": pytest.approx(math.sqrt(acc_norm * (1 - acc_norm) / 4))}


def test_multiple_choice_over_long_items_score_the_tail_in_context(tmp_path):
    """Context 5: '[bos] a' + 'wxyzw' (7 tokens) keeps 'wxyzw'; the first 'w' lost its left neighbour, so
    only x, y, z, w are scored; the short choice 'v' is scored whole."""
    table = random_table(5)
    long_sum = seq_logp(table, ids("wxyzw"), 1)
    short_sum = seq_logp(table, [BOS, *ids("av")], 2)
    answer = 0 if long_sum > short_sum else 1
    norm_answer = 0 if long_sum / 5 > short_sum else 1
    rows = [{"prompt": "a", "choices": ["wxyzw", "v"], "answer": answer}]
    task = EvalTask(name="mc", kind="multiple_choice", data=write_rows(tmp_path, rows))
    r = run_multiple_choice(Bigram(table, max_len=5), TOK, task, 1)
    assert r.score == 1.0 and r.extra["acc_norm"] == float(norm_answer == answer)
    # the same item with the answer flipped scores 0: the choice really is decided by those sums
    flipped = write_rows(tmp_path, [{**rows[0], "answer": 1 - answer}], "flipped.jsonl")
    assert run_multiple_choice(Bigram(table, max_len=5), TOK, task.model_copy(update={"data": flipped}), 1).score == 0.0
    assert abs(long_sum - short_sum) > 1e-3 and abs(seq_logp(table, [BOS, *ids("awxyzw")], 2) - long_sum) > 1e-3


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------
def test_perplexity_of_texts_by_hand(tmp_path):
    """Texts score every token after bos, eos included: 'ab' -> a, b, eos; '' -> eos; 'cab' -> c, a, b, eos."""
    table = random_table(7)
    texts = ["ab", "", "cab"]
    nll = [-logp(table, s[t - 1], s[t]) for s in ([BOS, *ids(x), EOS] for x in texts) for t in range(1, len(s))]
    n, mean = len(nll), sum(nll) / len(nll)
    std = math.sqrt(sum((x - mean) ** 2 for x in nll) / (n - 1))
    task = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, [{"text": x} for x in texts]))
    r = run_perplexity(Bigram(table), TOK, task, 2)
    assert n == 8 and r.n == 8
    assert r.score == pytest.approx(math.exp(mean), rel=1e-5) and r.extra == {"nll": pytest.approx(mean, rel=1e-5)}
    assert r.stderr == pytest.approx(math.exp(mean) * std / math.sqrt(n), rel=1e-4)
    assert (r.name, r.kind, r.metric, r.higher_is_better, r.unit) == ("ppl", "perplexity", "perplexity", False, "ratio")


def test_perplexity_of_completions_and_truncation_by_hand(tmp_path):
    """A prompt/completion row scores the completion and eos; context 4 keeps '[bos] a b c' of 'abcde'."""
    table = random_table(8)
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "ef"}]
    nll = [-logp(table, *pair) for pair in [(ids("b")[0], ids("c")[0]), (ids("c")[0], EOS),
                                            (ids("d")[0], ids("e")[0]), (ids("e")[0], ids("f")[0]), (ids("f")[0], EOS)]]  # fmt: skip
    task = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, rows))
    r = run_perplexity(Bigram(table), TOK, task, 2)
    assert r.n == 5 and r.extra["nll"] == pytest.approx(sum(nll) / 5, rel=1e-5)
    text = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, [{"text": "abcde"}], "t.jsonl"))
    r = run_perplexity(Bigram(table, max_len=4), TOK, text, 1)
    assert r.n == 3 and r.extra["nll"] == pytest.approx(-seq_logp(table, [BOS, *ids("abc")], 1) / 3, rel=1e-5)


def test_perplexity_single_token_overflow_and_nothing_to_score(tmp_path):
    """One scored token: stderr 0. NLL exactly 700 per token: perplexity inf (exp would overflow past it)."""
    table = torch.full((V, V), -1e4)
    table[BOS, ids("a")[0]] = 0.0
    table[BOS, EOS] = -700.0  # log p(eos | bos) = -700 exactly in float32 (the rest underflows)
    one = EvalTask(name="p", kind="perplexity", data=write_rows(tmp_path, [{"text": ""}]))
    r = run_perplexity(Bigram(table), TOK, one, 1)
    assert r.n == 1 and r.extra["nll"] == 700.0 and r.score == math.inf and r.stderr == 0.0
    table[BOS, EOS] = -699.0
    clear_encoding_cache()
    assert run_perplexity(Bigram(table), TOK, one, 1).score == pytest.approx(math.exp(699.0))
    cut = EvalTask(name="cut", kind="perplexity", data=write_rows(tmp_path, [{"prompt": "abcd", "completion": "e"}], "c.jsonl"))
    with pytest.raises(RecipeError, match="eval task 'cut': no tokens to score"):
        run_perplexity(Bigram(table, max_len=3), TOK, cut, 1)


# ---------------------------------------------------------------------------------------------
# kl_to_base
# ---------------------------------------------------------------------------------------------
def kl_at(base_table, tuned_table, token: int) -> float:
    log_b = torch.log_softmax(base_table[token].double(), -1)
    log_t = torch.log_softmax(tuned_table[token].double(), -1)
    return float((log_b.exp() * (log_b - log_t)).sum())


def test_kl_to_base_by_hand(tmp_path):
    """KL(p_base || p_tuned) at every position of '[bos] a b' and '[bos] c' (no eos): 5 values."""
    base_t, tuned_t = random_table(1), random_table(2)
    kl = [kl_at(base_t, tuned_t, t) for t in [BOS, *ids("ab"), BOS, *ids("c")]]
    mean = sum(kl) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in kl) / 4)
    task = EvalTask(name="kl", kind="kl_to_base", data=write_rows(tmp_path, [{"text": "ab"}, {"text": "c"}]))
    r = run_kl_to_base(Bigram(tuned_t), TOK, task, 1, base_model=Bigram(base_t))
    assert r.n == 5 and r.score == pytest.approx(mean, rel=1e-4) and r.stderr == pytest.approx(std / math.sqrt(5), rel=1e-3)
    assert (r.name, r.kind, r.metric, r.higher_is_better, r.unit) == ("kl", "kl_to_base", "kl", False, "nats")
    reverse = run_kl_to_base(Bigram(base_t), TOK, task, 1, base_model=Bigram(tuned_t)).score
    assert abs(reverse - r.score) > 1e-3  # KL is not symmetric: the direction is checked


def test_kl_to_base_of_prompts_truncation_and_one_position(tmp_path):
    """Prompt rows: '[bos] ab' and '[bos] a' + 'bc'; context 2 keeps two positions of each; '' -> one position."""
    base_t, tuned_t = random_table(1), random_table(2)
    rows = [{"prompt": "ab"}, {"prompt": "a", "completion": "bc"}]
    task = EvalTask(name="kl", kind="kl_to_base", data=write_rows(tmp_path, rows))
    r = run_kl_to_base(Bigram(tuned_t), TOK, task, 2, base_model=Bigram(base_t))
    expected = [kl_at(base_t, tuned_t, t) for t in [BOS, *ids("ab"), BOS, *ids("abc")]]
    assert r.n == 7 and r.score == pytest.approx(sum(expected) / 7, rel=1e-4)
    r = run_kl_to_base(Bigram(tuned_t, max_len=2), TOK, task, 2, base_model=Bigram(base_t))
    expected = [kl_at(base_t, tuned_t, t) for t in [BOS, *ids("a"), BOS, *ids("a")]]
    assert r.n == 4 and r.score == pytest.approx(sum(expected) / 4, rel=1e-4)
    one = EvalTask(name="kl1", kind="kl_to_base", data=write_rows(tmp_path, [{"text": ""}], "one.jsonl"))
    r = run_kl_to_base(Bigram(tuned_t), TOK, one, 1, base_model=Bigram(base_t))
    assert r.n == 1 and r.stderr == 0.0 and r.score == pytest.approx(kl_at(base_t, tuned_t, BOS), rel=1e-4)
    with pytest.raises(RecipeError, match="kl_to_base needs the base model"):
        run_kl_to_base(Bigram(tuned_t), TOK, one, 1)


# ---------------------------------------------------------------------------------------------
# run_task and the lm_eval kind's hand-off
# ---------------------------------------------------------------------------------------------
def test_run_task_dispatches_by_kind_and_times_the_call(tmp_path):
    base_t, tuned_t = random_table(1), random_table(2)
    task = EvalTask(name="kl", kind="kl_to_base", data=write_rows(tmp_path, [{"text": "ab"}]))
    before = time.perf_counter()
    r = run_task(Bigram(tuned_t), TOK, task, 1, Bigram(base_t))
    elapsed = time.perf_counter() - before
    assert r.metric == "kl" and r.n == 3 and 0.0 < r.seconds <= elapsed
    assert r.score == pytest.approx(sum(kl_at(base_t, tuned_t, t) for t in [BOS, *ids("ab")]) / 3, rel=1e-4)


def test_lm_eval_kind_hands_its_arguments_on(monkeypatch):
    seen, result = [], SimpleNamespace(seconds=None)
    monkeypatch.setattr(lmeval, "run_lm_eval_task", lambda *args: seen.append(args) or result)
    task = EvalTask(name="lm", kind="lm_eval", lm_eval_tasks=["x"])
    model = limited(None)
    assert run_task(model, TOK, task, 3) is result and result.seconds >= 0.0
    assert seen == [(model, TOK, task, 3)]


@pytest.mark.parametrize(
    ("runner", "encoder", "row"),
    [
        (run_exact_match, "_encode_exact_match", {"prompt": "a", "completion": "b"}),
        (run_multiple_choice, "_encode_multiple_choice", {"prompt": "a", "choices": ["b", "c"], "answer": 0}),
        (run_perplexity, "_encode_perplexity", {"text": "ab"}),
        (run_kl_to_base, "_encode_kl", {"text": "ab"}),
    ],
)
def test_each_kind_encodes_its_data_once_per_tokenizer(monkeypatch, tmp_path, runner, encoder, row):
    """Called every N training steps, a task re-reads and re-encodes nothing while its data file is unchanged."""
    fake_generation(monkeypatch, ["b"])
    original, built = getattr(tasks, encoder), []
    monkeypatch.setattr(tasks, encoder, lambda *a: built.append(1) or original(*a))
    task = EvalTask(name="t", kind=runner.__name__.removeprefix("run_"), data=write_rows(tmp_path, [row]))
    model = Bigram(random_table(0))
    first = runner(model, TOK, task, 2, base_model=Bigram(random_table(1)))
    second = runner(model, TOK, task, 2, base_model=Bigram(random_table(1)))
    assert built == [1] and first.score == second.score


def test_exact_match_rows_need_a_prompt(tmp_path):
    task = EvalTask(name="em", kind="exact_match", data=write_rows(tmp_path, [{"completion": "a"}]))
    with pytest.raises(RecipeError, match=r"rows need column\(s\) \['prompt'\]"):
        run_exact_match(limited(None), TOK, task, 2)


@pytest.mark.parametrize(("row", "missing"), [({"prompt": "a"}, "['completion']"), ({"completion": "a"}, "['prompt']")])
def test_perplexity_rows_need_text_or_prompt_and_completion(tmp_path, row, missing):
    task = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, [row]))
    with pytest.raises(RecipeError) as err:
        run_perplexity(Bigram(random_table(0)), TOK, task, 1)
    assert str(err.value).startswith(f"eval task 'ppl' (perplexity): rows need column(s) {missing}")


def test_perplexity_without_eos_and_completion_scores_nothing(tmp_path):
    """A tokenizer with no eos and an empty completion: no scored position, start = len(ids) -> an error, not 0."""

    class NoEos:
        bos_token_id, eos_token_id, pad_token_id = BOS, None, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": ids(text)}

    task = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, [{"prompt": "ab", "completion": ""}]))
    assert tasks._encode_perplexity(task, NoEos()) == [([BOS, *ids("ab")], 3)]
    with pytest.raises(RecipeError, match="eval task 'ppl': no tokens to score"):
        run_perplexity(Bigram(random_table(0)), NoEos(), task, 1)


def test_perplexity_stderr_of_two_tokens(tmp_path):
    """'a' scores a and eos: stderr = ppl * |nll_1 - nll_2| / sqrt(2) / sqrt(2) (the sample std of two values)."""
    table = random_table(9)
    nll = [-logp(table, BOS, ids("a")[0]), -logp(table, ids("a")[0], EOS)]
    ppl = math.exp(sum(nll) / 2)
    task = EvalTask(name="ppl", kind="perplexity", data=write_rows(tmp_path, [{"text": "a"}]))
    r = run_perplexity(Bigram(table), TOK, task, 1)
    assert r.n == 2 and r.stderr == pytest.approx(ppl * abs(nll[0] - nll[1]) / 2, rel=1e-4) and r.stderr > 0


def test_kl_rows_need_text_or_prompt(tmp_path):
    task = EvalTask(name="kl", kind="kl_to_base", data=write_rows(tmp_path, [{"completion": "a"}]))
    with pytest.raises(RecipeError) as err:
        run_kl_to_base(Bigram(random_table(0)), TOK, task, 1, base_model=Bigram(random_table(1)))
    assert str(err.value).startswith("eval task 'kl' (kl_to_base): rows need column(s) ['prompt']")


class AdapterBigram(Bigram):
    """A PEFT-like model: the tuned table, or the base table inside ``disable_adapter()``."""

    def __init__(self, tuned: torch.Tensor, base: torch.Tensor):
        super().__init__(tuned)
        self.base_table = torch.nn.Parameter(base.float(), requires_grad=False)
        self.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=(self.base_table if self.disabled else self.table)[input_ids])


def test_kl_to_base_of_an_adapter_model_and_of_two_positions(tmp_path):
    """No base model given: the base is the same model with its adapter disabled. '[bos] a': 2 positions,
    stderr = |kl_1 - kl_2| / sqrt(2) / sqrt(2)."""
    base_t, tuned_t = random_table(1), random_table(2)
    kl = [kl_at(base_t, tuned_t, BOS), kl_at(base_t, tuned_t, ids("a")[0])]
    task = EvalTask(name="kl", kind="kl_to_base", data=write_rows(tmp_path, [{"text": "a"}]))
    r = run_kl_to_base(AdapterBigram(tuned_t, base_t), TOK, task, 1)
    assert r.n == 2 and r.score == pytest.approx(sum(kl) / 2, rel=1e-4)
    assert r.stderr == pytest.approx(abs(kl[0] - kl[1]) / 2, rel=1e-3) and r.stderr > 0
