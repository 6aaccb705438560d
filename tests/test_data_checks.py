"""Bad training data: exit 2 naming file, row and field; warnings once with counts for doubtful data."""

from __future__ import annotations

import json

import pytest
from conftest import build_char_tokenizer
from typer.testing import CliRunner

from cli.main import app
from preserve_core.data import IGNORE, build_train_dataset, load_rows, tokenize_rows
from preserve_core.errors import RecipeError
from preserve_core.recipe import load_recipe
from preserve_core.recipe_schema import DataConfig

TOKENIZER = build_char_tokenizer()  # one token per character of a-z 0-9 " =+:,.>\n"; others are <unk>


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def tokenize(path: str, context: int | None = None, **data):
    return tokenize_rows(load_rows(path), TOKENIZER, DataConfig(train=path, **data), context)


GOOD = {"prompt": "ab=", "completion": "ba"}


@pytest.mark.parametrize(
    ("bad_row", "field", "words"),
    [
        ({"prompt": "cd="}, "completion", "missing or null"),
        ({"prompt": None, "completion": "dc"}, "prompt", "missing or null"),
        ({"prompt": "cd=", "completion": 5}, "completion", "is int 5, not text"),
        ({"prompt": ["c"], "completion": "dc"}, "prompt", "not text"),
    ],
)
def test_bad_field_names_file_row_and_field(tmp_path, bad_row, field, words):
    path = write_rows(tmp_path / "d.jsonl", [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(RecipeError) as err:
        tokenize(path)
    assert f"{path}, row 3: field '{field}'" in str(err.value) and words in str(err.value)


def test_empty_and_broken_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(RecipeError, match="is empty"):
            load_rows(str(tmp_path / name))
    path = write_rows(tmp_path / "broken.jsonl", [GOOD, GOOD, "{not json", GOOD])
    with pytest.raises(RecipeError, match=r"broken.jsonl, line 3: not valid JSON"):
        load_rows(path)


def test_all_empty_completions_refused_some_warned_once(tmp_path, capsys):
    with pytest.raises(RecipeError, match="all 2 completions are empty"):
        tokenize(write_rows(tmp_path / "all.jsonl", [{"prompt": "a=", "completion": ""}, {"prompt": "b=", "completion": " "}]))
    path = write_rows(tmp_path / "some.jsonl", [GOOD, {"prompt": "a=", "completion": ""}, GOOD, {"prompt": "b=", "completion": ""}])
    dataset, report = tokenize(path)
    assert report.empty_completions == 2 and len(dataset) == 4
    assert dataset[1]["labels"] == [IGNORE] * 3 + [TOKENIZER.eos_token_id]  # bos a = | eos
    first = capsys.readouterr().err
    assert "2 of 4 completions are empty" in first
    tokenize(path)
    assert "completions are empty" not in capsys.readouterr().err  # once per data set


def test_unknown_characters_counted_and_shown(tmp_path, capsys):
    rows = [{"prompt": "h\u00e9llo=", "completion": "\u20ac\u20ac"}, GOOD, {"prompt": "x=", "completion": "\u00e9"}]
    _, report = tokenize(write_rows(tmp_path / "unk.jsonl", rows))
    assert (report.unk_examples, report.unk_tokens) == (2, 4)  # row 1: e-acute + 2 euro; row 3: e-acute
    assert sorted(report.unk_chars) == ["\u00e9", "\u20ac"]
    err = capsys.readouterr().err
    assert "2 of 3 examples hold 4 tokens" in err and "'\u00e9'" in err


def test_rows_over_the_model_context_are_cut_or_refused(tmp_path, capsys):
    long_row = {"prompt": "a" * 100 + "=", "completion": "b" * 10}  # bos + 101 + 10 + eos = 113 tokens
    path = write_rows(tmp_path / "long.jsonl", [long_row, GOOD])
    with pytest.raises(RecipeError, match="row 1 has 113 tokens, over the model's context of 64 positions"):
        tokenize(path, context=64, max_length=1000)
    dataset, report = tokenize(path, context=64, max_length=1000, truncation="left")
    assert len(dataset[0]["input_ids"]) == 64 and report.truncated == 1 and report.limit == 64
    assert dataset[0]["labels"][-11:] == dataset[0]["input_ids"][-11:]  # the completion + eos kept whole
    assert "1 of 2 examples were longer than 64 tokens (the model's context)" in capsys.readouterr().err
    _, report = tokenize(path, context=64, max_length=40, truncation="left")
    assert report.limit == 40  # data.max_length below the context wins


def test_build_train_dataset_uses_the_model_context(write_recipe, tmp_path):
    long_row = {"prompt": "a" * 200 + "=", "completion": "b" * 10}
    path = write_rows(tmp_path / "long.jsonl", [long_row, GOOD])
    recipe = load_recipe(write_recipe(data={"train": path, "max_length": 1000, "truncation": "left"}))
    dataset, report = build_train_dataset(recipe, TOKENIZER)
    assert report.context == 128 and len(dataset[0]["input_ids"]) == 128  # conftest's max_position_embeddings


def test_bad_data_exits_2_from_the_cli(write_recipe, tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, {"prompt": "cd=", "completion": 7}])
    result = CliRunner().invoke(app, ["train", str(write_recipe(data={"train": path})), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "row 2: field 'completion' is int 7" in result.output.replace("\n", "")
