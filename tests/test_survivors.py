"""Tests for mutants that survived `make mutation` (docs/reliability.md, "Mutation testing").

Each states the mutant it kills; the answers are written by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_char_tokenizer

from preserve_core.errors import RecipeError
from preserve_core.evaluation.tasks import _encode_multiple_choice
from preserve_core.methods.fora.bases import orthonormal_complement
from preserve_core.recipe_schema import EvalTask

TOKENIZER = build_char_tokenizer()


def _mc_task(tmp_path, rows) -> EvalTask:
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return EvalTask(name="mc", kind="multiple_choice", data=str(path))


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "0 <= answer < len(choices)"),  # answer == len: '<' not '<='
        ({"prompt": "q", "choices": [], "answer": 0}, "non-empty choices"),  # 'or' not 'and'
        ({"prompt": "q", "choices": ["a"], "answer": -1}, "0 <= answer"),
        ({"choices": ["a", "b"], "answer": 0}, "['prompt']"),  # the prompt column is required
        ({"prompt": "q", "choices": ["a", "b"]}, "['answer']"),
        ({"prompt": "q", "answer": 0}, "['choices']"),
    ],
)
def test_multiple_choice_rows_are_checked(tmp_path, row, words):
    with pytest.raises(RecipeError) as err:
        _encode_multiple_choice(_mc_task(tmp_path, [row]), TOKENIZER)
    assert words in str(err.value)


def test_multiple_choice_items_by_hand(tmp_path):
    """Prompt 'ab' -> [bos, a, b]; choices 'c', 'de' appended; spans and answers as given."""
    items, spans, answers, lengths = _encode_multiple_choice(
        _mc_task(tmp_path, [{"prompt": "ab", "choices": ["c", "de"], "answer": 1}]), TOKENIZER
    )
    head = [TOKENIZER.bos_token_id, *TOKENIZER("ab", add_special_tokens=False)["input_ids"]]
    assert items == [(head + TOKENIZER("c", add_special_tokens=False)["input_ids"], 3),
                     (head + TOKENIZER("de", add_special_tokens=False)["input_ids"], 3)]  # fmt: skip
    assert spans == [(0, 2)] and answers == [1] and lengths == [1, 2]


def test_orthonormal_complement_keeps_dtype_and_completes_the_basis():
    q = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0]  # float32 [6, 2]
    q_c = orthonormal_complement(q)
    assert q_c.dtype == torch.float32 and q_c.shape == (6, 4)
    full = torch.cat([q, q_c], dim=1).double()
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
