"""Strict recipe validation: no coercion, finite numbers in range, duplicate keys, confined names,
unreadable files; every failure exit 2 with file, line and key, and a seeded fuzz over all of it.

The valid and invalid values below are written by hand from the documented ranges (docs/recipes.md),
not read from the schema, so a loosened or missing bound in the code fails here.
"""

from __future__ import annotations

import json
import math
import random
import typing

import pytest
import typer
import yaml
from pydantic import BaseModel

from cli.common import guarded
from preserve_core.recipe import Recipe, load_recipe

BASE = {
    "name": "fuzz",
    "model": {"name_or_path": "lab:tiny"},
    "data": {"train": "lab:shift", "eval": "lab:shift@eval", "max_length": 32, "max_examples": 100},
    "method": {"name": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0},
    "training": {
        "lr": 1.0e-3, "max_steps": 10, "batch_size": 8, "grad_accum": 1, "warmup_steps": 0, "weight_decay": 0.0,
        "adam_betas": [0.9, 0.999], "adam_eps": 1.0e-8, "max_grad_norm": 1.0, "seed": 0, "log_every": 1,
        "eval_every": 0, "save_every": 0, "keep_last": 2,
    },
    "calibration": {
        "num_samples": 16, "batch_size": 4, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0,
        "min_new_tokens": 2, "max_repeat_fraction": 0.5, "max_task_examples": 16, "stats_batch_size": 4,
        "fisher_samples": 8, "kl_topk": 8,
    },
    "eval": {
        "batch_size": 16, "every_n_steps": 0, "fail_on_regression": 5.0,
        "target": [{"name": "shift", "kind": "exact_match", "data": "lab:shift", "limit": 8, "max_new_tokens": 8}],
        "preserve": [{"name": "reverse", "kind": "exact_match", "data": "lab:reverse"}],
    },
    "bench": {
        "methods": [{"label": "lora_a", "method": {"name": "lora"}, "lrs": [1.0e-3]}],
        "tasks": [{"name": "shift", "train": "lab:shift", "eval": "lab:shift", "max_new_tokens": 8, "limit": 4}],
        "seeds": [0], "kl_limit": 8,
    },
}  # fmt: skip

INF, NAN = math.inf, math.nan
# kind -> (valid values, invalid values); by hand from the documented ranges.
KINDS = {
    "int>0": ([1, 7, 1000], [0, -1, 2.5, 3.0, True, "3", None, INF]),
    "int>=0": ([0, 3], [-1, 1.5, False, "0", None]),
    "int>0|null": ([1, 50, None], [0, -2, 1.5, True, "4"]),
    "float>0": ([1e-5, 0.5, 3, 2.0], [0, -1e-4, INF, -INF, NAN, True, "0.1", "1e400", None]),
    "float>=0": ([0, 0.0, 2.5], [-1e-9, INF, NAN, False, "1"]),
    "float>=0|null": ([0.0, 3, None], [-0.5, INF, NAN, True]),
    "float>0|null": ([0.25, 10, None], [0, -1, INF, True]),
    "[0,1)": ([0, 0.5, 0.999], [1, 1.5, -0.1, NAN, True]),
    "(0,1]": ([1, 0.5, 1e-3], [0, 1.01, -0.5, NAN, "0.5"]),
    "seed": ([0, 42, 2**32 - 1], [-1, 2**32, 1.0, True, "7", None]),
}  # fmt: skip
FIELDS = {
    ("data", "max_length"): "int>0", ("data", "max_examples"): "int>0|null",
    ("method", "r"): "int>0", ("method", "alpha"): "float>0", ("method", "dropout"): "[0,1)",
    ("training", "lr"): "float>0", ("training", "max_steps"): "int>0", ("training", "batch_size"): "int>0",
    ("training", "grad_accum"): "int>0", ("training", "warmup_steps"): "int>=0",
    ("training", "weight_decay"): "float>=0", ("training", "adam_eps"): "float>0",
    ("training", "adam_betas", 0): "[0,1)", ("training", "adam_betas", 1): "[0,1)",
    ("training", "max_grad_norm"): "float>0|null", ("training", "seed"): "seed", ("training", "log_every"): "int>0",
    ("training", "eval_every"): "int>=0", ("training", "save_every"): "int>=0", ("training", "keep_last"): "int>0",
    ("calibration", "num_samples"): "int>0", ("calibration", "batch_size"): "int>0",
    ("calibration", "max_new_tokens"): "int>0", ("calibration", "temperature"): "float>0",
    ("calibration", "top_p"): "(0,1]", ("calibration", "seed"): "seed", ("calibration", "min_new_tokens"): "int>=0",
    ("calibration", "max_repeat_fraction"): "(0,1]", ("calibration", "max_task_examples"): "int>0|null",
    ("calibration", "stats_batch_size"): "int>0", ("calibration", "fisher_samples"): "int>0",
    ("calibration", "kl_topk"): "int>0", ("calibration", "stats_memory_gb"): "float>0|null",
    ("eval", "batch_size"): "int>0", ("eval", "every_n_steps"): "int>=0", ("eval", "fail_on_regression"): "float>=0|null",
    ("eval", "target", 0, "limit"): "int>0|null", ("eval", "target", 0, "max_new_tokens"): "int>0",
    ("bench", "kl_limit"): "int>0", ("bench", "tasks", 0, "max_new_tokens"): "int>0",
    ("bench", "tasks", 0, "limit"): "int>0|null", ("bench", "methods", 0, "lrs", 0): "float>0",
    ("bench", "seeds", 0): "seed",
}  # fmt: skip
NAME_FIELDS = [("name",), ("bench", "tasks", 0, "name"), ("bench", "methods", 0, "label")]
GOOD_NAMES = ["run-1", "a.b_c", "x" * 100, "Shift2"]
BAD_NAMES = ["../x", "../../../x", "/abs", "a/b", "a\\b", "a\0b", "..", ".hidden", "x" * 101, "", "  ", 5, True]
PATH_FIELDS = [("data", "train"), ("eval", "target", 0, "data"), ("bench", "tasks", 0, "eval")]
BAD_REFS = ["lab:shift@bogus", "lab:shfit", "lab:shift@", "/no/such/file.jsonl", "/tmp/" + "p" * 300, "a\0b.jsonl"]
SECTIONS = ["model", "data", "method", "training", "calibration", "eval", "bench", "output"]
NOT_A_SECTION = [True, 3, "text", [1, 2], None]


def run_validate(path, sets=()) -> tuple[int, str]:
    """``ppft validate`` in-process, through the CLI's error handling: (exit code, message)."""
    messages = []
    from cli import common

    printer = common.err_console.print
    common.err_console.print = lambda text, **_: messages.append(str(text))
    try:
        guarded(lambda: load_recipe(path, list(sets)), debug=False)
        code = 0
    except typer.Exit as e:
        code = e.exit_code
    finally:
        common.err_console.print = printer
    return code, "\n".join(messages)


def set_at(data, loc: tuple, value) -> None:
    """Set a value at a key path; a no-op where an earlier (invalid) mutation removed the path."""
    for key in loc[:-1]:
        if not _has(data, key):
            return
        data = data[key]
    if isinstance(data, dict) or _has(data, loc[-1]):
        data[loc[-1]] = value


def _has(container, key) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and key < len(container)


def as_set(loc: tuple, value) -> str:
    return ".".join(map(str, loc)) + "=" + json.dumps(value).replace("NaN", ".nan").replace("-Infinity", "-.inf").replace("Infinity", ".inf")


def mutate(rng: random.Random, data: dict, sets: list, extra_text: list, valid: bool) -> str:
    """Apply one mutation (valid or not, as asked) to the recipe; return a label for failure messages."""
    kind = rng.choice(["field", "field", "field", "name", "ref", "section", "unknown", "missing", "dup", "method"])
    if valid:
        kind = rng.choice(["field", "name"])
    if kind == "field":
        loc = rng.choice(list(FIELDS))
        value = rng.choice(KINDS[FIELDS[loc]][0 if valid else 1])
    elif kind == "name":
        loc, value = rng.choice(NAME_FIELDS), rng.choice(GOOD_NAMES if valid else BAD_NAMES)
    elif kind == "ref":
        loc, value = rng.choice(PATH_FIELDS), rng.choice(BAD_REFS)
    elif kind == "section":
        loc, value = (rng.choice(SECTIONS),), rng.choice(NOT_A_SECTION)
    elif kind == "unknown":
        loc, value = (rng.choice(SECTIONS[1:6]), rng.choice(["lrr", "max_step", "bogus", "seeds"])), 1
    elif kind == "missing":
        data.pop(rng.choice(["data", "method"]), None)
        return kind
    elif kind == "method":
        loc, value = ("method", "name"), rng.choice(["lorra", "", 3, None, "../lora"])
    else:
        section = rng.choice(SECTIONS[:6])
        extra_text.append(f"{section}:\n  {{}}\n")
        return f"duplicate {section}"
    if not valid and rng.random() < 0.3 and kind in ("field", "name"):  # valid ones in the file, under any --set
        sets.append(as_set(loc, value))
    else:
        set_at(data, loc, value)
    return f"{kind} {loc}={value!r}"


def write_case(path, data: dict, extra_text: list) -> None:
    text = yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, allow_unicode=False)
    path.write_text(text + "".join(extra_text))


def test_fuzz_mutated_recipes_exit_2_or_0_never_a_traceback(tmp_path):
    """1,200 seeded cases: invalid ones exit 2 with a message, valid controls exit 0, nothing else."""
    rng = random.Random(1234)
    path = tmp_path / "fuzz.yaml"
    counts = {0: 0, 2: 0}
    for case in range(1200):
        data, sets, extra = json.loads(json.dumps(BASE)), [], []
        invalid = case % 4 != 0
        labels = [mutate(rng, data, sets, extra, valid=True) for _ in range(rng.randint(0, 2))]
        if invalid:
            labels += [mutate(rng, data, sets, extra, valid=False) for _ in range(rng.randint(1, 2))]
        write_case(path, data, extra)
        code, message = run_validate(path, sets)
        expected = 2 if invalid else 0
        assert code == expected, f"case {case} {labels} {sets}: exit {code}, wanted {expected}\n{message}"
        if code == 2:
            assert message.startswith("[bold red]invalid input:") and "Traceback" not in message, message
        counts[code] += 1
    assert counts[0] == 300 and counts[2] == 900


def test_fuzz_garbled_bytes_exit_0_or_2(tmp_path):
    """Random byte edits of a valid recipe file: whatever they do, the answer is 0 or 2 with a message."""
    rng = random.Random(99)
    text = yaml.safe_dump(BASE, sort_keys=False).encode()
    path = tmp_path / "garbled.yaml"
    codes = []
    for _ in range(300):
        raw = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.choice(b":-[]{}#&*!|>'\"%@`\t\n \x00\xff0123456789.e")
        path.write_bytes(bytes(raw))
        code, message = run_validate(path)
        assert code in (0, 2), f"{bytes(raw)!r}\nexit {code}: {message}"
        codes.append(code)
    assert codes.count(2) > 100  # most edits break something, and each was caught as bad input


def test_base_of_the_fuzz_is_valid(tmp_path):
    path = tmp_path / "base.yaml"
    write_case(path, BASE, [])
    assert run_validate(path) == (0, "")


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("training.max_steps=yes", "training.max_steps", "valid integer"),
        ("training.lr=true", "training.lr", "valid number"),
        ('training.lr="1e400"', "training.lr", "valid number"),
        ("training.lr=1e400", "training.lr", "finite"),
        ("training.lr=.inf", "training.lr", "finite"),
        ("training.lr=inf", "training.lr", "valid number"),
        ("training.adam_eps=-1e-8", "training.adam_eps", "greater than 0"),
        ("training.max_grad_norm=-1", "training.max_grad_norm", "greater than 0"),
        ("training.seed=-1", "training.seed", "greater than or equal to 0"),
        ("training.adam_betas=[2, 2]", "training.adam_betas.0", "less than 1"),
        ("data.train=lab:shift@bogus", "data.train", "no split 'bogus'"),
        ("eval.target=true", "eval.target", "valid list"),
    ],
)
def test_issue_cases_are_refused_with_key(tmp_path, override, key, words):
    path = tmp_path / "r.yaml"
    write_case(path, BASE, [])
    code, message = run_validate(path, [override])
    assert code == 2 and key in message and words in message, message
    assert f"--set {override}" in message


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("lr: 0.001", "lr: 3e-4"))
    assert load_recipe(path).training.lr == 3e-4
    assert load_recipe(path, ["training.lr=2E-5"]).training.lr == 2e-5


def test_wrong_value_names_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False).replace("adam_eps: 1.0e-08", "adam_eps: -1.0e-08")
    path.write_text(text)
    line = text.splitlines().index("  adam_eps: -1.0e-08") + 1
    code, message = run_validate(path)
    assert code == 2 and f"{path}:{line}: training.adam_eps" in message


def test_duplicate_key_names_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  train: lab:shift\nmethod:\n  name: lora\n  r: 4\n  r: 8\n")
    code, message = run_validate(path)
    assert code == 2 and f"{path}:6" in message and "'r' is given twice (lines 5 and 6)" in message


@pytest.mark.parametrize(
    "name", ["../../../x", "/tmp/abs", "a/b", "..", "a\0b", "x" * 101, "C:evil", "a\\b"], ids=repr
)
def test_names_are_confined_to_their_folder(tmp_path, name):
    for loc in NAME_FIELDS:
        data = json.loads(json.dumps(BASE))
        set_at(data, loc, name)
        path = tmp_path / "r.yaml"
        write_case(path, data, [])
        code, message = run_validate(path)
        assert code == 2 and ".".join(map(str, loc)) in message, message
        assert "folder name" in message or "characters long" in message, message


def test_default_name_from_a_bad_file_name_says_where_it_came_from(tmp_path):
    path = tmp_path / "my..recipe.yaml"
    write_case(path, {k: v for k, v in BASE.items() if k != "name"}, [])
    code, message = run_validate(path)
    assert code == 2 and "name defaults to the file name" in message


def test_unreadable_recipe_files_exit_2(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    (tmp_path / "extends_folder.yaml").write_text("extends: folder.yaml\n")
    cases = {
        folder: "is a folder",
        tmp_path / "latin1.yaml": "not UTF-8",
        tmp_path / "deep.yaml": "nested",
        tmp_path / "extends_folder.yaml": "is a folder",
        tmp_path / ("n" * 300 + ".yaml"): "File name too long",
        tmp_path / "nul\0.yaml": "NUL",
    }
    for path, words in cases.items():
        code, message = run_validate(path)
        assert code == 2 and words in message, (path, message)


def test_every_numeric_field_has_a_range():
    """Each int/float option of every section and method states a bound (or is a checked count/fraction)."""
    from preserve_core.methods import METHODS

    checked_elsewhere = {"keep", "hard_k"}  # folora: validator refuses <= 0
    unbounded = []

    def walk(cls, prefix):
        for name, field in cls.model_fields.items():
            text = str(field.annotation)
            nested = [a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            for sub in nested + ([field.annotation] if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else []):
                walk(sub, f"{prefix}{name}.")
            numeric = ("int" in text or "float" in text) and "Literal" not in text
            bounded = any(type(m).__name__ in ("Gt", "Ge", "Interval") for m in field.metadata) or "ge=" in text or "gt=" in text
            if numeric and not bounded and name not in checked_elsewhere:
                unbounded.append(prefix + name)

    walk(Recipe, "")
    for method in METHODS.values():
        walk(method.Options, f"method[{method.name}].")
    assert unbounded == [], unbounded


def test_coercion_is_refused_at_the_library_level_too():
    from preserve_core.recipe_schema import TrainingConfig

    for bad in ({"max_steps": True}, {"lr": "0.1"}, {"lr": float("nan")}, {"seed": 2**32}):
        with pytest.raises(ValueError):
            TrainingConfig(**bad)
    assert TrainingConfig(lr=1, adam_betas=[0.5, 0.9]).adam_betas == (0.5, 0.9)
