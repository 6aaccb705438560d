"""Render the recipe reference (docs/recipes.md) from the schema, so the docs cannot drift from the code."""

from __future__ import annotations

import json
import types
import typing

import annotated_types
from pydantic import AfterValidator, BaseModel

from .methods import METHODS
from .methods.regularizer_options import REGULARIZER_OPTIONS
from .recipe_schema import (
    CalibrationConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    EvalTask,
    ModelConfig,
    OutputConfig,
    TrainingConfig,
    check_name,
)

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("model", ModelConfig),
    ("data", DataConfig),
    ("training", TrainingConfig),
    ("training.distributed", DistributedConfig),
    ("calibration", CalibrationConfig),
    ("eval", EvalConfig),
    ("eval.target[] / eval.preserve[]", EvalTask),
    ("output", OutputConfig),
]

HEADER = """# Recipe reference

Generated from the schema by `python -m preserve_core.recipe_docs > docs/recipes.md` (a test checks it is
current). Every section is strict: unknown keys are errors. Relative paths resolve against the recipe
file that sets them; `extends: other.yaml` inherits a recipe and overrides it key by key (lists are
replaced, mappings merged). `--set key.path=value` overrides any key from the command line (the value is
parsed as YAML). `name` defaults to the recipe file's name; `output.dir` defaults to `./runs/<name>`.
Naming another method (`--set method.name=full`, or a `method.name` in a file that `extends:` one with a
different method) replaces the whole `method` block: the other method's options are dropped, and the
`--set method.*` of the same command apply on top (`--set method.name=lora --set method.r=16`).
Errors name the file and line that hold the offending key (the base file for an inherited one).

Values are never coerced: `true` is not 1, `"3"` is not 3, `3.0` is not an integer; numbers must be
finite (no `.inf`, `.nan`) and inside the range the type column gives. A key written twice in one
mapping is an error. A `name` (recipe, bench task, bench label) becomes a folder name: at most 100
characters, no `/`, `\\`, `:`, `..`, leading `.` or control characters. Every error names the file,
line and key; the exit code is 2.
"""


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    return f"`{json.dumps(value)}`" if not isinstance(value, BaseModel) else "(section)"


BOUNDS = {annotated_types.Gt: ("gt", ">"), annotated_types.Ge: ("ge", ">="), annotated_types.Lt: ("lt", "<"), annotated_types.Le: ("le", "<=")}


def _bounds(metadata) -> list[str]:
    out = []
    for item in metadata:
        for kind, (attr, symbol) in BOUNDS.items():
            if isinstance(item, kind):
                out.append(f"{symbol} {getattr(item, attr)}")
        if isinstance(item, AfterValidator) and item.func is check_name:
            out.append("folder name")
    return out


def _render(tp) -> str:
    """A readable type: ``float >= 0``, ``str | None``, ``tuple[float >= 0 < 1, ...]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return " ".join([_render(args[0]), *_bounds(args[1:])])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _render(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_render(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _type(field) -> str:
    if "RegularizerOptions" in str(field.annotation):
        return "list[regulariser]"
    return " ".join([_render(field.annotation), *_bounds(field.metadata)]).replace("|", "\\|")


def section_table(title: str, model: type[BaseModel]) -> str:
    summary = ((model.__doc__ or "").strip().splitlines() or [""])[0]
    rows = [f"## `{title}`", "", summary, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{_type(field)}` | {_default(field)} | {text} |")
    return "\n".join(rows) + "\n"


def render() -> str:
    parts = [HEADER]
    for title, model in SECTIONS:
        parts.append(section_table(title, model))
    parts.append("## `method`\n\n`method.name` picks the method; the other keys are that method's options.\n")
    for name, method in METHODS.items():
        parts.append(section_table(f"method: {name}", method.Options))
    parts.append(
        "## `method.regularizers[]`\n\nAny method takes functional regularisers on top, each at most once, "
        "e.g. `regularizers: [{name: kl, strength: 0.5}, {name: replay, rho: 0.1}]` "
        "(docs/methods/composition.md). `name` picks one; the other keys are its options.\n"
    )
    for name, options in REGULARIZER_OPTIONS.items():
        parts.append(section_table(f"regularizers[]: {name}", options))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
