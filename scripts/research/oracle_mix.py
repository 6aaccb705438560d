"""Write runs/oracle_mix.jsonl: lab:preserve_mix (the old skills' own text) in a seeded random order.

The lab writes preserve_mix skill by skill (400 `rev` rows, then `srt`, ...) and calibration's
`preserve_source: dataset` takes the FIRST num_samples rows, so 256 rows of the file as built are all
`rev`. Shuffled, the first 256 hold about 51 of each skill: the oracle h12_oracle.yaml means.
Usage: python scripts/research/oracle_mix.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from preserve_core.lab import resolve_data_ref


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/oracle_mix.jsonl")
    rows = [json.loads(line) for line in Path(resolve_data_ref("lab:preserve_mix")).read_text().splitlines() if line]
    random.Random(0).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} rows; first 256 by skill:", {k: sum(r['text'].startswith(k + ':') for r in rows[:256]) for k in ("rev", "srt", "kv", "cyc", "cnt")})


if __name__ == "__main__":
    main()
