"""Reading recipe YAML strictly: one parse, key lines kept, duplicate keys and unreadable files refused.

Differences from ``yaml.safe_load``:
- a key given twice in one mapping is an error naming both lines (``safe_load`` silently keeps the last);
- ``3e-4`` is a float, as in YAML 1.2 (PyYAML's YAML 1.1 rules read it as the string ``"3e-4"``);
- a file that is a folder, not UTF-8, nested absurdly deep or otherwise unreadable is a
  :class:`RecipeError` (exit 2) that says what is wrong, never a raw ``OSError`` or ``RecursionError``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import RecipeError

Location = tuple[str, int]  # (file or "--set ...", line)
MAX_DEPTH = 32  # nesting levels of a recipe; the schema needs 5, a method dict in bench a few more

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader (libyaml's when installed) that refuses duplicate keys and reads ``1e-4`` as a float."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node, self.name)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def _refuse_duplicate_keys(node: yaml.MappingNode, file: str) -> None:
    first_line: dict[tuple, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise RecipeError(
                f"{file}:{line}: key '{key_node.value}' is given twice (lines {first_line[key]} and {line}); "
                "YAML would silently keep only the last one. Delete one of them."
            )
        first_line[key] = line


def parse_yaml(text: str, source: str):
    """``(data, root node)`` of one YAML document; ``source`` names it in errors."""
    loader = None
    try:
        loader = RecipeLoader(text)
        loader.name = source
        node = loader.get_single_node()
        _check_depth(node, source)
        return (loader.construct_document(node) if node is not None else None), node
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply (more than {MAX_DEPTH} levels); a recipe needs a few") from None
    except yaml.YAMLError as e:
        if "nesting depth" in str(e):  # libyaml's own limit
            raise RecipeError(f"{source}: nested too deeply (more than {MAX_DEPTH} levels); a recipe needs a few") from None
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_depth(node, source: str) -> None:
    stack = [(node, 1)] if node is not None else []
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            line = current.start_mark.line + 1
            raise RecipeError(f"{source}:{line}: nested more than {MAX_DEPTH} levels deep; a recipe needs a few")
        if isinstance(current, yaml.MappingNode):
            stack += [(v, depth + 1) for _, v in current.value]
        elif isinstance(current, yaml.SequenceNode):
            stack += [(v, depth + 1) for v in current.value]


def printable_path(path: str | Path) -> str:
    """The path as text an error message can show (a NUL byte written as \\0)."""
    return str(path).replace("\0", "\\0")


def read_text(path: Path, what: str = "recipe file") -> str:
    """The UTF-8 text of ``path``, or a RecipeError that says why it cannot be read."""
    shown = printable_path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{what} not found: {shown}") from None
    except IsADirectoryError:
        raise RecipeError(f"{shown}: is a folder, not a {what}; give the path of a .yaml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{shown}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the {what} as UTF-8"
        ) from None
    except ValueError:  # embedded NUL in the path
        raise RecipeError(f"{what} path contains a NUL character: {shown!r}") from None
    except OSError as e:
        raise RecipeError(f"{shown}: cannot read the {what}: {e.strerror or e}") from None


def key_lines(node, file: str) -> dict[tuple, Location]:
    """Map each key path (tuple of keys and list indices) to the (file, line) where it is written."""
    lines: dict[tuple, Location] = {}
    stack = [(node, ())]
    while stack:
        current, prefix = stack.pop()
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                path = (*prefix, key.value)
                lines[path] = (file, key.start_mark.line + 1)
                stack.append((value, path))
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                lines[(*prefix, i)] = (file, item.start_mark.line + 1)
                stack.append((item, (*prefix, i)))
    return lines


def parse_value(raw: str, source: str):
    """One ``--set`` value, parsed by the same rules as a recipe file."""
    return parse_yaml(raw, source)[0]
