"""bench/bench_fora_speed.py's bookkeeping: the flop count per input and the paired-round ratios, by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_fora_speed", REPO / "bench" / "bench_fora_speed.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_projection_work_counts_min_k_n_minus_k_per_weight_and_groups_shared_inputs():
    from preserve_core.methods.fora.bases import ForaBases, RightProjector
    from preserve_core.methods.fora.layer import ForaLinear

    n = 10
    shared = RightProjector(torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64))[0].float())  # k = 3
    complement = RightProjector(torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0].float(), True)  # k = 4 of 6

    def layer(m, projector, r_u=0):
        width = projector.vectors.shape[0]
        bases = ForaBases(projector, torch.zeros(m, r_u), torch.zeros(m, 0), torch.zeros(width, 0))
        return ForaLinear(nn.Linear(width, m), bases)

    model = nn.ModuleDict({"a": layer(4, shared), "b": layer(5, shared, r_u=1), "c": layer(10, complement)})
    work = bench.projection_work(model, tokens=7)
    assert sorted((i["n"], i["k"], len(i["layers"])) for i in work["inputs"]) == [(6, 4, 1), (10, 3, 2)]
    # 4 m n (min(k, n - k) + r_u): a 4*4*10*3, b 4*5*10*(3+1), c 4*10*6*2; matmuls 3 m n T
    assert work["projection_macs"] == 480 + 800 + 480
    assert work["target_matmul_macs"] == 3 * 7 * (40 + 50 + 60)
    assert work["predicted_ratio_on_targets"] == 1 + 1760 / 3150


def test_ratio_is_the_median_of_per_round_ratios():
    rounds = [{"full": {"step_seconds_median": f, "tokens_per_step": 8}, "fora_full": {
        "step_seconds_median": o, "tokens_per_step": 8, "inputs": [], "projection_macs": 1, "target_matmul_macs": 2,
        "predicted_ratio_on_targets": 1.5}} for f, o in ((2.0, 3.0), (4.0, 4.0), (3.0, 6.0))]  # fmt: skip
    combined = bench.combine(rounds)
    assert combined["fora_full"]["ratio_per_round"] == [1.5, 1.0, 2.0]
    assert combined["fora_full"]["ratio_to_full"] == 1.5  # not 4.0 / 3.0, the ratio of medians
    assert combined["fora_full"]["step_seconds_median"] == 4.0 and combined["full"]["step_seconds_median"] == 3.0
