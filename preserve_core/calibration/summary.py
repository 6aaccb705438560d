"""Per-input summary of a calibration: width, tokens, and effective ranks of C_p and C_t."""

from __future__ import annotations

import torch

from .store import Calibration, write_json

ENERGIES = (0.90, 0.95, 0.99)
SUMMARY = "summary.json"


def effective_ranks(cov: torch.Tensor, energies: tuple[float, ...] = ENERGIES) -> list[int]:
    """For each ``e``: the smallest ``k`` whose top-``k`` eigenvalues of ``cov`` hold a fraction ``e``
    of the trace (eigenvalues in float64, negatives from rounding clamped to 0; 0 for a zero matrix)."""
    eig = torch.linalg.eigvalsh(cov.double()).clamp_min(0).flip(0)
    total = float(eig.sum())
    if total <= 0:
        return [0 for _ in energies]
    cumulative = torch.cumsum(eig, 0) / total
    n = eig.numel()
    return [min(int(torch.searchsorted(cumulative, torch.tensor(e, dtype=torch.float64))) + 1, n) for e in energies]


def summary_rows(cal: Calibration, device: torch.device | str = "cpu", write_cache: bool = True) -> list[dict]:
    """One row per input key: ``key, dim, modules, tokens_p, ranks_p, tokens_t, ranks_t``.

    Ranks of a statistic the folder does not hold are None. The eigenvalues cost O(n^3) per key
    (asked for only by ``ppft calibrate --summary``), so rows are cached in ``summary.json``.
    """
    cached = _read_cache(cal)
    if cached is not None:
        return cached
    rows = []
    per_key = cal.manifest["counts"]["per_key"]
    for key in cal.keys():
        info = cal.manifest["keys"][key]
        rows.append({
            "key": key,
            "dim": info["dim"],
            "modules": len(info["modules"]),
            "tokens_p": per_key[key].get("preserve"),
            "ranks_p": _ranks(cal, "preserve", key, device),
            "tokens_t": per_key[key].get("task"),
            "ranks_t": _ranks(cal, "task", key, device),
        })
    if write_cache:
        write_json(cal.dir / SUMMARY, {"created_with": cal.manifest["created"], "energies": list(ENERGIES), "stats": cal.stats(), "rows": rows})
    return rows


def _ranks(cal: Calibration, which: str, key: str, device) -> list[int] | None:
    return effective_ranks(cal.cov_by_key(which, key).to(device)) if which in cal.stats() else None


def _read_cache(cal: Calibration) -> list[dict] | None:
    import json

    try:
        data = json.loads((cal.dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    same = data.get("created_with") == cal.manifest["created"] and data.get("energies") == list(ENERGIES)
    same = same and data.get("stats") == cal.stats()
    return data["rows"] if same else None
