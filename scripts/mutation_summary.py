"""Summarise a (possibly partial) `make mutation` run: per file, mutants killed / survived / untested.

Reads mutmut's per-file results (``mutants/**/*.py.meta``). Score = (killed + timeout) / checked, as
mutmut's own score: ``checked`` counts every mutant given a verdict, including those of functions no
fast test executes ("no tests", never killed); mutants not run (outside a sample, or not reached
before a run stopped) are left out. With ``--sample`` (the run of ``scripts/mutation_sample.py``) the
score is an estimate for all mutants, with a 95% Wilson interval.

    python scripts/mutation_summary.py [--survivors N] [--sample]   # markdown on stdout
"""

from __future__ import annotations

import argparse
import json
import math
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


def checked(counts: Counter) -> int:
    return sum(counts[c] for c in COLUMNS if c != "not run")


def score(counts: Counter) -> float | None:
    """(killed + timeout) / checked; a timeout is a mutant that made its tests hang, so it was detected."""
    n = checked(counts)
    return (counts["killed"] + counts["timeout"]) / n if n else None


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion ``successes / n``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def table(results: dict[str, dict[str, str]]) -> list[str]:
    lines = ["| file | " + " | ".join(COLUMNS) + " | score |", "|---" * (len(COLUMNS) + 2) + "|"]
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
    parser.add_argument("--sample", action="store_true", help="only the mutants of mutants/sample.txt")
    args = parser.parse_args()
    results = load(args.root)
    if args.sample:
        chosen = set((args.root / "sample.txt").read_text().split())
        results = {path: {k: v for k, v in st.items() if k in chosen} for path, st in results.items()}
        results = {path: st for path, st in results.items() if st}
    print("\n".join(table(results)))
    total = sum((Counter(st.values()) for st in results.values()), Counter())
    n = checked(total)
    if n:
        low, high = wilson(total["killed"] + total["timeout"], n)
        print(f"\nscore {score(total):.1%} of {n} checked mutants; 95% interval {low:.1%} to {high:.1%}")
    survivors = [name for statuses in results.values() for name, status in statuses.items() if status == "survived"]
    if args.survivors and survivors:
        print("\nSurvivors (`mutmut show <name>` prints the diff):\n")
        print("\n".join(f"- `{name}`" for name in survivors[: args.survivors]))


if __name__ == "__main__":
    main()
