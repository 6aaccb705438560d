"""bench/memory_model.py (docs/memory.md's formulas) against hand counts, and against the bytes the
statistics pass really holds on a random `smoke`-shaped model (bench/realshape.py): bench/bench_memory.py
compares measurements with this model, so a wrong formula would pass as a measured agreement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import memory_model as mm  # noqa: E402
from realshape import SHAPES, make  # noqa: E402

SMOKE = SHAPES["smoke"]  # hidden 256, intermediate 768, 4 heads x 64: inputs 256, 256, 256, 768


def test_gram_sums_by_hand():
    assert mm.gram_sums(100) == 4 * 100 * 100  # narrow: one full square
    assert mm.gram_sums(256) == 4 * 256 * 256  # round(256 / 512) = 0 -> one block
    assert mm.gram_sums(768) == 4 * (384 * 768 + 384 * 384)  # two blocks of 384 rows, upper ones only
    assert mm.gram_sums(2048) == 4 * 512 * (2048 + 1536 + 1024 + 512)  # four blocks: 5/8 of the square
    assert mm.gram_sums(6144) == 4 * 6144 * 6144 * 9 // 16  # eight blocks of 768 rows


def test_disk_adapter_and_fora_bases_by_hand():
    per_layer_inputs = 3 * 256 * 257 // 2 + 768 * 769 // 2  # packed upper triangles
    assert mm.calibration_disk(SMOKE, 2, 2) == 2 * 2 * 4 * per_layer_inputs
    # q 256x256, k 128x256, v 128x256, o 256x256, gate 768x256, up 768x256, down 256x768
    rm = 8 * ((256 + 256) + (128 + 256) * 2 + (256 + 256) + (768 + 256) * 2 + (256 + 768))
    assert mm.adapter_with_adam(SMOKE, 1, 8) == 3 * 4 * rm
    ks = [10, 250, 128, 700]  # min(k, n - k): 10, 6, 128, 68
    no_u1 = {name: 0 for name, _, _ in SMOKE.target_shapes()}
    assert mm.fora_held(SMOKE, 1, ks, no_u1, 0) == 4 * (256 * 10 + 256 * 6 + 256 * 128 + 768 * 68)


def test_passes_under_a_budget_by_hand():
    """Forward order 256, 256, 256, 768 per layer: 262144 x 3 + 1769472 bytes; 3e6 bytes fit the first
    layer and one input of the second."""
    passes, largest, _ = mm.calibration_passes(SMOKE, 2, 3_000_000)
    assert (passes, largest) == (2, 3 * 262144 + 1769472 + 262144)
    assert mm.calibration_passes(SMOKE, 2)[:2] == (1, 2 * (3 * 262144 + 1769472))


def test_gradient_init_groups_by_hand():
    """Per layer q 256x256, k 128x256, v 128x256, o 256x256, gate / up 768x256, down 256x768 in float32: in
    units of 131072 bytes 2, 1, 1, 2, 6, 6, 6 (24 a layer). A 1.2e6-byte budget (9.16 units), in forward
    order: [q k v o] 6, [gate] 6, [up] 6, [down, q, k] 9, [v o gate] 9, [up] 6, [down] 6; one below every
    matrix runs them one by one."""
    unit = 131072
    assert mm.gradient_init_passes(SMOKE, 2) == (1, 48 * unit)
    assert mm.gradient_init_passes(SMOKE, 2, 1_200_000) == (7, 9 * unit)
    assert mm.gradient_init_passes(SMOKE, 1, 10) == (7, 6 * unit)


@pytest.mark.parametrize("budget", [None, 1_200_000, 2_000_000])
def test_the_gradient_start_groups_as_the_model_predicts(budget):
    """``init: gradient``'s grouping (gradient_init.layer_groups) on a random smoke-shaped model's targets:
    the passes and the largest group's float32 G bytes the memory model predicts."""
    from preserve_core.methods.gradient_init import layer_groups
    from preserve_core.models import resolve_target_modules

    model, _ = make("smoke", 2)
    layers = {name: model.get_submodule(name) for name in resolve_target_modules(model, None)}
    groups = layer_groups(layers, budget)
    held = [sum(4 * layers[name].weight.numel() for name in group) for group in groups]
    assert (len(groups), max(held)) == mm.gradient_init_passes(SMOKE, 2, budget)


@pytest.mark.parametrize("budget", [None, 3_000_000])
def test_the_statistics_pass_holds_what_the_model_predicts(budget):
    from preserve_core.calibration.stats import input_stats_passes
    from preserve_core.models import resolve_target_modules

    model, _ = make("smoke", 2)
    ids = torch.randint(4, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    targets = resolve_target_modules(model, None)
    parts = input_stats_passes(model, targets, batches, "all", budget_bytes=budget)
    held = [sum(g.nbytes() for g in part.sums.values()) for part in parts]
    passes, largest, _ = mm.calibration_passes(SMOKE, 2, budget)
    assert (len(held), max(held)) == (passes, largest)
