"""Run mutmut on a seeded random sample of the mutants (`make mutation MUTATION_SAMPLE=0.1`).

A full run of the ~6,500 mutants takes hours on two cores; a uniform sample estimates the same
score with a known error (Wilson interval, printed by ``scripts/mutation_summary.py``). The sample is a
function of the seed and the mutant names only, so a rerun after new tests checks the same mutants.

    python scripts/mutation_sample.py --fraction 0.1 --seed 0 --jobs 2

mutmut has no generate-only command: a first ``mutmut run`` with a filter that matches nothing
generates the mutants and maps tests to functions, then stops on its "nothing matches" check.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

MUTMUT = str(Path(sys.executable).with_name("mutmut"))
NO_MATCH = "ppft.generate-only.matches-no-mutant"


def generate() -> None:
    """Generate the mutants and mutmut's test-to-function map (the no-match run's failure is expected)."""
    subprocess.run([MUTMUT, "run", NO_MATCH], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not Path("mutants").is_dir():
        sys.exit("mutmut did not generate mutants/: run it by hand (`mutmut run`) to see why")


def all_mutant_names() -> list[str]:
    """Every mutant name, from ``mutmut results --all true`` (lines ``name: status``)."""
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return sorted(line.strip().rsplit(": ", 1)[0] for line in out.splitlines() if "__mutmut_" in line)


def sample(names: list[str], fraction: float, seed: int) -> list[str]:
    """A uniform sample of ``round(fraction * len(names))`` names; the same seed gives the same sample."""
    k = max(1, round(fraction * len(names)))
    return sorted(random.Random(seed).sample(names, k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        sys.exit(f"--fraction must be in (0, 1], got {args.fraction}")
    generate()
    names = all_mutant_names()
    chosen = names if args.fraction == 1 else sample(names, args.fraction, args.seed)
    Path("mutants/sample.txt").write_text("\n".join(chosen) + "\n")
    print(f"{len(chosen)} of {len(names)} mutants (seed {args.seed}); list in mutants/sample.txt", flush=True)
    named = [] if args.fraction == 1 else chosen  # no names: mutmut resumes an interrupted full run
    sys.exit(subprocess.run([MUTMUT, "run", "--max-children", str(args.jobs), *named], check=False).returncode)


if __name__ == "__main__":
    main()
