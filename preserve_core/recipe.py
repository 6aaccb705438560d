"""Loading recipes: YAML with ``extends:``, ``--set`` overrides, strict validation, errors with lines.

A recipe is validated as a whole by :class:`Recipe`. Every error names the YAML key path and the
file and line it came from (or the ``--set`` that introduced it), and unknown keys get a
did-you-mean suggestion. Relative paths resolve against the file that set them.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, ValidationError

from .errors import RecipeError
from .methods import METHODS
from .methods.regularizer_options import REGULARIZER_OPTIONS
from .recipe_schema import (
    BenchConfig,
    CalibrationConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    Name,
    StrictModel,
    TrainingConfig,
)
from .recipe_yaml import Location, key_lines, parse_value, parse_yaml, printable_path, read_text

MethodConfig = Annotated[Union[tuple(m.Options for m in METHODS.values())], Field(discriminator="name")]  # noqa: UP007

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class Recipe(StrictModel):
    """A whole recipe. ``name`` defaults to the recipe file's stem."""

    name: Name | None = Field(None, description="Names the default run folder runs/<name>; default: the file's stem.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    def run_dir(self) -> Path:
        return Path(self.output.dir)

    def calibration_dir(self) -> Path:
        return Path(self.calibration.dir) if self.calibration.dir else self.run_dir() / "calibration"

    def resolved(self) -> dict:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# YAML with locations
# ---------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> tuple[dict, dict[tuple, Location]]:
    """Parse ``path``; return the data and a map from key path (tuple) to (file, line)."""
    data, node = parse_yaml(read_text(path), printable_path(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections (model:, data:, method: ...)")
    return data, key_lines(node, str(path))


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _method_name(data: dict) -> Any:
    method = data.get("method")
    return method.get("name") if isinstance(method, dict) else None


def _switches_method(base: dict, override: dict) -> bool:
    """True when ``override`` names a method other than ``base``'s: its options are then another method's."""
    new, old = _method_name(override), _method_name(base)
    return new is not None and old is not None and new != old


def _drop_lines_under(lines: dict, prefix: tuple) -> dict:
    return {k: v for k, v in lines.items() if k[: len(prefix)] != prefix}


def _merge_recipe(parent: tuple[dict, dict], child: tuple[dict, dict]) -> tuple[dict, dict]:
    """Child over parent; a child naming another method replaces the parent's method block whole."""
    (parent_data, parent_lines), (data, lines) = parent, child
    if _switches_method(parent_data, data):
        parent_data = {k: v for k, v in parent_data.items() if k != "method"}
        parent_lines = _drop_lines_under(parent_lines, ("method",))
    return _deep_merge(parent_data, data), {**parent_lines, **lines}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _resolve_paths_in_place(data: dict, base_dir: Path) -> None:
    """Make the relative local paths this file sets absolute, against the file's folder.

    Sections of the wrong type are left alone here: validation then reports them with their line.
    """

    def fix(section, key: str, always_local: bool = False) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str) and "\0" not in section[key]:
            value = section[key]
            section[key] = _absolute(base_dir / value) if always_local else resolve_local_path(value, base_dir)

    fix(data.get("model"), "name_or_path")
    fix(data.get("data"), "train")
    fix(data.get("data"), "eval")
    fix(data.get("calibration"), "preserve_data")
    fix(data.get("calibration"), "dir", always_local=True)
    fix(data.get("output"), "dir", always_local=True)
    bench = _dict(data.get("bench"))
    fix(bench, "out_dir", always_local=True)
    fix(bench, "kl_data")
    for task in _list(bench.get("tasks")):
        fix(task, "train")
        fix(task, "eval")
    for suite in ("target", "preserve"):
        for task in _list(_dict(data.get("eval")).get(suite)):
            fix(task, "data")
            fix(task, "lm_eval_include_path")


def _absolute(path: Path) -> str:
    """``path`` expanded and made absolute; left as given if the OS cannot resolve it (validation says why)."""
    try:
        return str(path.expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return str(path)


def path_exists(path: str | Path) -> bool:
    """``Path.exists`` that answers False instead of raising for names the OS refuses (too long, NUL)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def resolve_local_path(value: str, base_dir: Path) -> str:
    """``lab:`` refs and hub names stay; local-looking or existing relative paths become absolute."""
    if value.startswith("lab:") or Path(value).is_absolute():
        return value
    candidate = _absolute(base_dir / value)
    looks_local = value.startswith((".", "~")) or value.endswith(DATA_SUFFIXES) or path_exists(candidate)
    if value.startswith("~"):
        return _absolute(Path(value))
    return candidate if looks_local else value


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    path = Path(_absolute(path))
    if path in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, (*seen, path)))}")
    data, lines = _read_yaml(path)
    _resolve_paths_in_place(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data, lines
    if not isinstance(parent, str):
        raise RecipeError(f"{path}:{lines[('extends',)][1]}: extends: must be a path to another recipe")
    if not parent.strip() or "\0" in parent:
        raise RecipeError(f"{path}:{lines[('extends',)][1]}: extends: {parent!r} is not a file path")
    return _merge_recipe(_load_with_extends((path.parent / parent), (*seen, path)), (data, lines))


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------
def parse_override(override: str) -> tuple[list[Any], Any]:
    """``key.path=value`` -> (key parts, list indices as ints; value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {override!r}: expected key.path=value, for example --set training.lr=3e-4")
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    value = parse_value(raw, f"--set {override!r}") if raw.strip() else ""
    return parts, value


def reset_method_for_overrides(data: dict, lines: dict, overrides: list[str]) -> None:
    """``--set method.name=X`` naming another method: start X's block afresh.

    The file's options belong to its own method (FORA's ``form`` means nothing to ``full``), so
    they are dropped; every ``--set method.*`` of the same command still applies on top.
    """
    names = [(override, value) for override in overrides for parts, value in [parse_override(override)]
             if parts == ["method", "name"]]
    if names and _switches_method(data, {"method": {"name": names[-1][1]}}):
        data["method"] = {}
        kept = _drop_lines_under(lines, ("method",))
        lines.clear()
        lines.update(kept)
        lines[("method",)] = (f"--set {names[-1][0]}", 0)


def apply_override(data: dict, lines: dict, override: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to ``data``; list items by index."""
    parts, value = parse_override(override)
    node: Any = data
    for i, part in enumerate(parts):
        here = ".".join(map(str, parts[: i + 1]))
        if isinstance(node, list) and (not isinstance(part, int) or part >= len(node)):
            raise RecipeError(f"--set {override!r}: {here} is not an item of the list (it has {len(node)})")
        if not isinstance(node, (dict, list)):
            shown = ".".join(map(str, parts[:i]))
            raise RecipeError(f"--set {override!r}: {shown} is {_short_repr(node)} in the recipe, not a section; set {shown} itself")
        if i == len(parts) - 1:
            node[part] = value
        elif isinstance(node, dict) and node.get(part) is None:
            node[part] = {}  # a section the recipe does not write yet
        node = node[part]
    for loc in [loc for loc in lines if loc[: len(parts)] == tuple(parts)]:
        del lines[loc]  # the file's lines for what this value replaced
    lines[tuple(parts)] = (f"--set {override}", 0)


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------
def _model_class_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at ``loc`` (for did-you-mean suggestions)."""
    cls: Any = Recipe
    parents = loc[:-1]
    if len(parents) >= 2 and parents[0] == "method" and parents[1] in METHODS:
        cls, parents = METHODS[parents[1]].Options, parents[2:]
    for i, part in enumerate(parents):
        if isinstance(part, int):
            continue
        if i >= 2 and parents[i - 2] == "regularizers" and part in REGULARIZER_OPTIONS:
            cls = REGULARIZER_OPTIONS[part]  # the discriminator tag pydantic inserts
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, Union, typing.Union) or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else (args[0] if len(args) == 1 else None)
    return annotation


def _display_loc(loc: tuple) -> tuple:
    """Drop the discriminator tags pydantic inserts (method.lora.r -> method.r,
    method.fora.regularizers.0.kl.strength -> method.regularizers.0.strength)."""
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHODS:
        loc = (loc[0], *loc[2:])
    if len(loc) >= 4 and loc[1] == "regularizers" and loc[3] in REGULARIZER_OPTIONS:
        loc = (*loc[:3], *loc[4:])
    return loc


def _where(loc: tuple, lines: dict) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            file, line = lines[loc[:n]]
            return file if line == 0 else f"{file}:{line}"
    return "recipe"


def _describe_error(err: dict, lines: dict) -> str:
    loc = _display_loc(tuple(err["loc"]))
    dotted = ".".join(map(str, loc)) or "(top level)"
    where = _where(loc, lines)
    if err["type"] == "extra_forbidden":
        cls = _model_class_at(tuple(err["loc"]))
        known = list(cls.model_fields) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{where}: {dotted}: unknown key.{hint} Valid keys here: {', '.join(known)}."
    if err["type"] == "union_tag_invalid" and "regularizers" in loc:
        name = str(err.get("input", {}).get("name", "")) if isinstance(err.get("input"), dict) else ""
        close = difflib.get_close_matches(name, list(REGULARIZER_OPTIONS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{where}: {dotted}.name: unknown regulariser '{name}'.{hint} Available: {', '.join(REGULARIZER_OPTIONS)}."
    if err["type"] == "union_tag_invalid":
        name = str(err.get("input", {}).get("name", "")) if isinstance(err.get("input"), dict) else ""
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        where = _where(("method", "name"), lines)
        return f"{where}: method.name: unknown method '{name}'.{hint} Available: {', '.join(METHODS)}."
    if err["type"] == "missing":
        return f"{where}: {dotted}: required key is missing."
    return f"{where}: {dotted}: {err['msg']} (got {_short_repr(err.get('input'))})."


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_recipe(data: dict, lines: dict) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err, lines) for err in e.errors()]
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems)) from None
    check_regularizers_fit(recipe, lines)
    return recipe


def check_regularizers_fit(recipe: Recipe, lines: dict) -> None:
    """``l2sp`` / ``ewc`` read the method's weight change: only methods that expose it can take them."""
    from .methods.regularizers import READS_WEIGHT_DELTAS

    method = METHODS[recipe.method.name]
    for i, options in enumerate(recipe.method.regularizers):
        if options.name in READS_WEIGHT_DELTAS and not method.has_weight_deltas:
            able = ", ".join(n for n, m in METHODS.items() if m.has_weight_deltas)
            raise RecipeError(
                f"{_where(('method', 'regularizers', i), lines)}: method.regularizers.{i}: the {options.name} regulariser "
                f"penalises the method's weight change, which method '{recipe.method.name}' does not expose "
                f"(its initialisation moves W). Use it with {able}, or use kl / replay."
            )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Recipe:
    """Load, merge, override, validate and fill in a recipe; returns a fully resolved :class:`Recipe`."""
    path = Path(path)
    data, lines = _load_with_extends(path)
    reset_method_for_overrides(data, lines, overrides or [])
    for override in overrides or []:
        apply_override(data, lines, override)
        _resolve_paths_in_place(data, Path.cwd())
    if output_dir is not None and isinstance(data.setdefault("output", {}), dict):
        data["output"]["dir"] = _absolute(Path(output_dir))
        lines[("output", "dir")] = (f"--output-dir {printable_path(output_dir)}", 0)
    if "name" not in data:
        data["name"] = path.stem
        lines[("name",)] = (f"{printable_path(path)} (name defaults to the file name)", 0)
    recipe = validate_recipe(data, lines)
    if recipe.output.dir is None:
        recipe.output.dir = str((Path.cwd() / "runs" / recipe.name).resolve())
    check_paths_exist(recipe, lines)
    return recipe


def check_lab_ref(loc: tuple, value: str, lines: dict) -> None:
    """A ``lab:`` ref must name a lab size (model) or a lab data set (data), without building anything."""
    from .lab import DATA_SETS, PRESETS

    name, at, split = value.removeprefix("lab:").partition("@")
    is_model = loc == ("model", "name_or_path")
    known = list(PRESETS) if is_model else DATA_SETS
    if name in known and at and (is_model or split not in ("train", "eval")):
        fix = f"use lab:{name}" if is_model else f"use lab:{name} (its train split) or lab:{name}@eval"
        raise RecipeError(f"{_where(loc, lines)}: {'.'.join(map(str, loc))}: '{value}': no split '{split}'; {fix}.")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean 'lab:{close[0]}'?" if close else ""
        raise RecipeError(
            f"{_where(loc, lines)}: {'.'.join(map(str, loc))}: unknown lab ref '{value}'.{hint} "
            f"Available: {', '.join('lab:' + k for k in known)}."
        )


def check_paths_exist(recipe: Recipe, lines: dict) -> None:
    """Every referenced local file must exist and every ``lab:`` ref must exist (hub names are checked when loaded)."""
    refs: list[tuple[tuple, str | None]] = [
        (("data", "train"), recipe.data.train),
        (("data", "eval"), recipe.data.eval),
        (("calibration", "preserve_data"), recipe.calibration.preserve_data),
    ]
    for suite in ("target", "preserve"):
        for i, task in enumerate(getattr(recipe.eval, suite)):
            refs.append((("eval", suite, i, "data"), task.data))
    refs.append((("model", "name_or_path"), recipe.model.name_or_path))
    for bench_i, task in enumerate(recipe.bench.tasks):
        refs += [(("bench", "tasks", bench_i, "train"), task.train), (("bench", "tasks", bench_i, "eval"), task.eval)]
    refs.append((("bench", "kl_data"), recipe.bench.kl_data))
    for loc, value in refs:
        if value and value.startswith("lab:"):
            check_lab_ref(loc, value, lines)
        elif value and Path(value).is_absolute() and not path_exists(value):
            raise RecipeError(
                f"{_where(loc, lines)}: {'.'.join(map(str, loc))}: file not found: {value}. "
                "Relative paths resolve against the recipe file's folder."
            )
