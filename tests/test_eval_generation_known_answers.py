"""Batched greedy generation's pieces (``preserve_core.evaluation.generation``) on inputs written out by hand.

The end-to-end check against a naive one-prompt-at-a-time decoder is in ``tests/test_evaluation.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preserve_core.evaluation import generation
from preserve_core.evaluation.generation import (
    StopOnStrings,
    _strip_after_eos,
    cut_at_stop,
    eos_ids,
    greedy_generate,
    left_pad,
)


class CharTok:
    """id ``i >= 3`` decodes to ``chr(ord('a') + i - 3)``; 0-2 are special (pad, bos, eos); records what it decodes."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self):
        self.decoded: list[list[int]] = []

    def decode(self, ids, skip_special_tokens=False):
        self.decoded.append(list(ids))
        return "".join(chr(ord("a") + i - 3) if i >= 3 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


def enc(text: str) -> list[int]:
    return [ord(c) - ord("a") + 3 for c in text]


def test_left_pad_by_hand():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]] and mask.dtype == torch.long


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("abc\ndef", ["\n"], "abc"),
        ("a\nb\nc", ["\n"], "a"),  # the first occurrence
        ("abc\ndef", ["e", "\n"], "abc"),  # the earliest stop wins, whatever the list order
        ("abc\ndef", ["", "c"], "ab"),  # an empty stop string is ignored
        ("xabc", ["x"], ""),  # a stop at position 0 leaves nothing
        ("abc", ["z"], "abc"),
        ("abc", [], "abc"),
    ],
)
def test_cut_at_stop(text, stops, expected):
    assert cut_at_stop(text, stops) == expected


def test_stop_on_strings_marks_rows_once_their_new_text_has_a_stop():
    tok = CharTok()
    crit = StopOnStrings(tok, ["", "bc"], prompt_width=3)
    assert crit.stops == ["bc"] and crit.done is None
    prompt = [enc("xbc"), enc("xyz")]  # row 0's prompt holds the stop: it does not count
    step1 = torch.tensor([p + n for p, n in zip(prompt, [enc("a"), enc("b")])])
    assert crit(step1, None).tolist() == [False, False]
    step2 = torch.tensor([p + n for p, n in zip(prompt, [enc("ab"), enc("bc")])])
    done = crit(step2, None)
    assert done.tolist() == [False, True] and done.dtype == torch.bool
    done[0] = True  # the caller's copy: the criterion's own state is untouched
    step3 = torch.tensor([p + n for p, n in zip(prompt, [enc("abc"), enc("bcd")])])
    tok.decoded.clear()
    assert crit(step3, None).tolist() == [True, True]  # row 1 stays done (no longer decoded), row 0 is done now
    assert tok.decoded == [enc("abc")]


def test_stop_on_strings_decodes_only_a_window_after_the_prompt():
    """Stop 'bc' (2 characters): the last 4 * 2 + 2 = 10 tokens are decoded, never the prompt."""
    tok = CharTok()
    crit = StopOnStrings(tok, ["bc"], prompt_width=2)
    row = enc("zz") + enc("defghijklmnopq")  # 2 prompt tokens + 14 new ones
    assert crit(torch.tensor([row]), None).tolist() == [False]
    assert tok.decoded == [enc("hijklmnopq")]
    tok.decoded.clear()
    short = StopOnStrings(tok, ["bc"], prompt_width=2)
    short(torch.tensor([enc("zz") + enc("def")]), None)
    assert tok.decoded == [enc("def")]
    split = StopOnStrings(tok, ["ab"], prompt_width=1)  # special tokens are not text: 'a', pad, 'b' reads 'ab'
    assert split(torch.tensor([enc("z") + enc("a") + [0] + enc("b")]), None).tolist() == [True]
    none = StopOnStrings(tok, [], prompt_width=1)
    assert none(torch.tensor([enc("abc"), enc("abc")]), None).tolist() == [False, False]


def test_eos_ids_from_tokenizer_and_generation_config():
    tok = SimpleNamespace(eos_token_id=2)
    model = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert eos_ids(model([9, 4]), tok) == [2, 4, 9]
    assert eos_ids(model((3,)), SimpleNamespace(eos_token_id=None)) == [3]
    assert eos_ids(model(7), tok) == [2, 7]
    assert eos_ids(model(None), tok) == [2]
    assert eos_ids(SimpleNamespace(), tok) == [2]
    assert eos_ids(model(2), SimpleNamespace(eos_token_id=None)) == [2]
    assert eos_ids(model(None), SimpleNamespace(eos_token_id=None)) == []


def test_strip_after_eos():
    assert _strip_after_eos([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert _strip_after_eos([5, 6], {2}) == [5, 6]
    assert _strip_after_eos([3, 5], {3, 4}) == []


def test_greedy_generate_batches_by_length_and_restores_the_order(monkeypatch):
    calls = []

    def generate_batch(model, tokenizer, prompts, max_new_tokens, stops):
        calls.append((model, tokenizer, prompts, max_new_tokens, stops))
        return [f"len{len(p)}:{p[0]}" for p in prompts]

    monkeypatch.setattr(generation, "generate_batch", generate_batch)
    prompts = [[10], [11, 1, 1], [12, 1], [13, 1, 1], [14]]
    out = greedy_generate("m", "t", prompts, 5, ["\n"], batch_size=2)
    assert out == ["len1:10", "len3:11", "len2:12", "len3:13", "len1:14"]
    assert [c[2] for c in calls] == [[[11, 1, 1], [13, 1, 1]], [[12, 1], [10]], [[14]]]  # longest first
    assert all(c[:2] == ("m", "t") and c[3:] == (5, ["\n"]) for c in calls)
    assert greedy_generate("m", "t", [], 5, [], batch_size=2) == []
    monkeypatch.setattr(generation, "generate_batch", lambda *a: ["only one"])
    with pytest.raises(ValueError):  # a batch answering for fewer prompts is an error, not a silent shift
        greedy_generate("m", "t", prompts, 5, [], batch_size=2)


@pytest.mark.parametrize(("pad", "eos", "expected_pad"), [(0, 2, 0), (None, 2, 2), (None, None, 0)])
def test_generate_batch_pads_on_the_left_with_the_tokenizers_pad_else_eos_else_0(pad, eos, expected_pad):
    """Prompts [7, 8, 9] and [5] are left-padded with the pad id (a tokenizer with neither pad nor EOS pads
    with 0, as training does, instead of failing); the new tokens from the first EOS on are cut."""

    class FakeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = {}

        def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
            self.seen.update(ids=input_ids, mask=attention_mask, pad=generation_config.pad_token_id)
            new = torch.tensor([[3, 4, 2, 5], [6, 6, 6, 6]])  # "ab" EOS "c"; "dddd"
            return torch.cat([input_ids, new], dim=1)

    tok = CharTok()
    tok.pad_token_id, tok.eos_token_id = pad, eos
    model = FakeModel()
    out = generation.generate_batch(model, tok, [[7, 8, 9], [5]], 4, [])
    p = expected_pad
    assert model.seen["ids"].tolist() == [[7, 8, 9], [p, p, 5]]
    assert model.seen["mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert model.seen["pad"] == p
    assert out == (["ab", "dddd"] if eos == 2 else ["abc", "dddd"])  # no EOS id: nothing is cut (2 decodes to "")
