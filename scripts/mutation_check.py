"""Run mutmut's mutants of some modules against chosen test files, in one process, one fork per mutant.

For checking new tests quickly without a second ``mutmut run``: mutmut's trampolines read
``MUTANT_UNDER_TEST`` at every call, so the test items are collected once; a first pass with
``MUTANT_UNDER_TEST=stats`` maps each test to the mutated functions it calls, then every mutant
runs, in a forked child, only the tests that call its function, stopping at the first failure.

    python scripts/mutation_check.py --mutants /path/to/clone/mutants --only 'evaluation\\.tasks\\.' \\
        --out tasks.tsv tests/test_eval_tasks_known_answers.py

``--mutants`` is the ``mutants/`` folder of a ``make mutation`` run made from the same source (its
mutated copies of ``preserve_core`` replace the modules here, in a temporary copy of this checkout).
Writes ``name<TAB>killed|survived|notests|rcN<TAB>diff`` per mutant; a summary on stdout.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import difflib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mutants(path: Path, module: str):
    """``(mutant name, one-line diff)`` for every ``x_<function>__mutmut_<n>`` in a mutated file."""
    src = path.read_text()
    lines = src.splitlines()
    funcs = {n.name: lines[n.lineno - 1 : n.end_lineno] for n in ast.walk(ast.parse(src))
             if isinstance(n, ast.FunctionDef) and "__mutmut_" in n.name}  # fmt: skip
    for name, body in funcs.items():
        base, _, n = name.rpartition("__mutmut_")
        if n != "orig":
            diff = difflib.unified_diff(funcs[f"{base}__mutmut_orig"][1:], body[1:], lineterm="", n=0)
            yield f"{module}.{name}", " ## ".join(d.strip() for d in diff if not d.startswith(("---", "+++", "@@")))


def mutated_files(mutants_dir: Path) -> list[Path]:
    return [p for p in sorted((mutants_dir / "preserve_core").rglob("*.py")) if "MutantDict" in p.read_text()]


def prepare_tree(mutants_dir: Path, files: list[Path]) -> Path:
    """A temporary copy of this checkout with ``files`` (mutated modules) copied over their originals."""
    tree = Path(tempfile.mkdtemp(prefix="mutation-check-")) / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs", "mutants"))
    for path in files:
        shutil.copy(path, tree / path.relative_to(mutants_dir))
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, required=True)
    parser.add_argument("--only", default="", help="regex on mutant names (module.x_function__mutmut_N)")
    parser.add_argument("--out", type=Path, default=Path("mutation_check.tsv"))
    parser.add_argument("--timeout", type=int, default=60, help="seconds per mutant")
    parser.add_argument("tests", nargs="+")
    args = parser.parse_args()
    out_path, only = args.out.resolve(), re.compile(args.only)
    todo, files = [], []
    for path in mutated_files(args.mutants):
        module = ".".join(path.relative_to(args.mutants).with_suffix("").parts)
        selected = [(name, diff) for name, diff in mutants(path, module) if only.search(name)]
        todo += selected
        files += [path] if selected else []
    tree = prepare_tree(args.mutants, files)
    atexit.register(shutil.rmtree, tree.parent, True)
    os.chdir(tree)
    sys.path.insert(0, str(tree))

    import mutmut.mutation.trampoline as trampoline
    import pytest
    from _pytest.runner import runtestprotocol

    hits: set[str] = set()
    trampoline.record_trampoline_hit = lambda name, caller=None: hits.add(name)

    def run_items(items) -> int:
        for i, item in enumerate(items):
            if any(r.failed for r in runtestprotocol(item, nextitem=items[i + 1] if i + 1 < len(items) else None, log=False)):
                return 1
        return 0

    class Loop:
        def pytest_runtestloop(self, session):
            callers = defaultdict(list)
            os.environ["MUTANT_UNDER_TEST"] = "stats"
            for i, item in enumerate(session.items):
                nxt = session.items[i + 1] if i + 1 < len(session.items) else None
                if any(r.failed for r in runtestprotocol(item, nextitem=nxt, log=False)):
                    raise SystemExit(f"{item.nodeid} fails without mutants")
                for function in hits:
                    callers[function].append(item)
                hits.clear()
            del os.environ["MUTANT_UNDER_TEST"]
            counts = Counter()
            with out_path.open("w") as out:
                for name, diff in todo:
                    items = callers.get(name.rpartition("__mutmut_")[0], [])
                    status = "notests" if not items else verdict(name, items)
                    counts[status] += 1
                    out.write(f"{name}\t{status}\t{diff[:300]}\n")
            print(f"\n{len(todo)} mutants: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + f" -> {out_path}")
            return True

    def verdict(name: str, items) -> str:
        pid = os.fork()
        if pid == 0:
            os.environ["MUTANT_UNDER_TEST"] = name
            signal.alarm(args.timeout)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            try:
                code = run_items(items)
            except BaseException:
                code = 3
            os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return {0: "survived", 1: "killed", 3: "killed"}.get(code, f"rc{code}")

    raise SystemExit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", *args.tests], plugins=[Loop()]))


if __name__ == "__main__":
    main()
