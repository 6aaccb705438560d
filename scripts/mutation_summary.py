"""Summarise a (possibly partial) `make mutation` run: per file, mutants killed / survived / untested.

Reads mutmut's per-file results (``mutants/**/*.py.meta``). Score = killed / (killed + survived +
timeout), over the mutants that were run; mutants of functions no fast test executes ("no tests")
and mutants not reached before the run stopped are counted separately, never as killed.

    python scripts/mutation_summary.py [--survivors N]   # markdown on stdout
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout",
          -24: "timeout", 152: "timeout", 255: "timeout", None: "not run"}  # fmt: skip
COLUMNS = ["killed", "survived", "timeout", "no tests", "not run"]


def load(root: Path) -> dict[str, dict[str, str]]:
    """``{source file: {mutant name: status}}`` from mutmut's meta files under ``root``."""
    out = {}
    for meta in sorted(root.glob("**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            out[str(meta.relative_to(root))[: -len(".meta")]] = {k: STATUS.get(v, "other") for k, v in codes.items()}
    return out


def score(counts: Counter) -> float | None:
    run = counts["killed"] + counts["survived"] + counts["timeout"]
    return counts["killed"] / run if run else None


def table(results: dict[str, dict[str, str]]) -> list[str]:
    lines = ["| file | " + " | ".join(COLUMNS) + " | killed of run |", "|---" * (len(COLUMNS) + 2) + "|"]
    total = Counter()
    for path, statuses in results.items():
        counts = Counter(statuses.values())
        total += counts
        s = score(counts)
        lines.append(f"| {path} | " + " | ".join(str(counts[c]) for c in COLUMNS) + f" | {f'{s:.1%}' if s is not None else '-'} |")
    s = score(total)
    lines.append("| **all** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + f" | **{f'{s:.1%}' if s is not None else '-'}** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", type=int, default=0, help="also list up to N surviving mutant names")
    args = parser.parse_args()
    results = load(args.root)
    print("\n".join(table(results)))
    survivors = [name for statuses in results.values() for name, status in statuses.items() if status == "survived"]
    if args.survivors and survivors:
        print("\nSurvivors (`mutmut show <name>` prints the diff):\n")
        print("\n".join(f"- `{name}`" for name in survivors[: args.survivors]))


if __name__ == "__main__":
    main()
