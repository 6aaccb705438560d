"""Known answers for the small functions of preserve_core/methods (issue 13's mutation run).

Every reference is built here from the definition (METHODS.md, the docstrings), in float64, on tiny
tensors chosen so that plausible slips (top vs tail triplets, off-by-one slices, a dropped damping, a
reversed mix, a missed anchor) change the answer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preserve_core.calibration.gram import UpperGram

from preserve_core.methods.corda_kpm import corda_kpm_factors
from preserve_core.methods.folora.method import Folora, FoloraOptions, _count_or_fraction
from preserve_core.methods.folora.refresh import TaskWindow, in_window, mix_estimate
from preserve_core.methods.fora.method import Fora, ForaOptions
from preserve_core.methods.residual_lora import svd_factors


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


# W [4, 6] = U diag(S) V^T with known, well separated singular values
SINGULAR = torch.tensor([9.0, 4.0, 2.25, 1.0], dtype=torch.float64)
U4, V4 = orthonormal(4, 4, 1), orthonormal(6, 4, 2)
W46 = U4 @ torch.diag(SINGULAR) @ V4.T


def triplet(i: int) -> torch.Tensor:
    """``S_i u_i v_i^T`` [4, 6]."""
    return SINGULAR[i] * torch.outer(U4[:, i], V4[:, i])


# -- residual inits (pissa / milora) ------------------------------------------------------------


@pytest.mark.parametrize(("minor", "picked"), [(False, [0, 1]), (True, [2, 3])])
def test_svd_factors_pick_the_top_or_the_minor_triplets(minor, picked):
    """r = 2 of 4 triplets, s = 0.5: ``B_0[:, i] A_0[i] = u_i S_i v_i^T / s`` and ``|A_0[i]| = |B_0[:, i]| = sqrt(S_i / s)``."""
    a0, b0 = svd_factors(W46.float(), 2, 0.5, minor)
    assert a0.shape == (2, 6) and b0.shape == (4, 2) and a0.dtype == b0.dtype == torch.float32
    for col, i in enumerate(picked):
        torch.testing.assert_close(torch.outer(b0[:, col], a0[col]).double(), triplet(i) / 0.5, atol=1e-5, rtol=0)
        root = float((SINGULAR[i] / 0.5).sqrt())
        assert a0[col].norm().item() == pytest.approx(root, rel=1e-5)
        assert b0[:, col].norm().item() == pytest.approx(root, rel=1e-5)
    total = 0.5 * b0.double() @ a0.double()
    torch.testing.assert_close(total, triplet(picked[0]) + triplet(picked[1]), atol=1e-5, rtol=0)


def test_svd_factors_with_one_triplet():
    """r = 1: the single largest (or smallest) triplet, never an empty or a neighbouring one."""
    a_top, b_top = svd_factors(W46.float(), 1, 2.0, minor=False)
    a_min, b_min = svd_factors(W46.float(), 1, 2.0, minor=True)
    torch.testing.assert_close(2.0 * (b_top @ a_top).double(), triplet(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(2.0 * (b_min @ a_min).double(), triplet(3), atol=1e-5, rtol=0)


# -- corda_kpm ----------------------------------------------------------------------------------


def corda_reference(weight: torch.Tensor, cov: torch.Tensor, r: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s B_0 A_0, W C)`` by hand: ``C = cov + damping mean(diag cov) I``; ``s B_0 A_0 = (sum of the r
    smallest triplets of W C) C^-1`` (float64, by numpy's SVD and inverse, not torch.linalg.solve)."""
    c = cov.double().numpy()
    n = c.shape[0]
    c = c + damping * (c.trace() / n) * torch.eye(n, dtype=torch.float64).numpy()
    import numpy as np

    u, sv, vh = np.linalg.svd(weight.double().numpy() @ c, full_matrices=False)
    smallest = (u[:, -r:] * sv[-r:]) @ vh[-r:]
    return torch.from_numpy(smallest @ np.linalg.inv(c)), torch.from_numpy(sv)


@pytest.mark.parametrize("r", [1, 3])
def test_corda_kpm_factors_match_the_definition(r):
    """W [4, 6] (fewer rows than columns, so a full SVD's extra rows would be null directions), an
    anisotropic C_p, damping 0.1 on mean(diag) = 2.5: the adapter holds the r smallest triplets of W C."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    cov = (x.T @ x / 40).float()
    s, damping = 0.5, 0.1
    a0, b0 = corda_kpm_factors(W46.float(), cov, r, s, damping)
    assert a0.shape == (r, 6) and b0.shape == (4, r)
    assert a0.dtype == b0.dtype == torch.float32
    expected, sv = corda_reference(W46, cov, r, damping)
    torch.testing.assert_close(s * b0.double() @ a0.double(), expected, atol=1e-4, rtol=1e-4)
    roots = (sv[-r:] / s).sqrt()  # |B_0[:, i]| = sqrt(S_i / s): the root sits on both factors
    torch.testing.assert_close(b0.double().norm(dim=0), roots, atol=1e-4, rtol=1e-4)


def test_corda_kpm_factors_keep_the_weights_dtype():
    cov = torch.eye(6)
    a0, b0 = corda_kpm_factors(W46, cov, 2, 1.0, 0.01)
    assert a0.dtype == b0.dtype == torch.float64
    a16, b16 = corda_kpm_factors(W46.to(torch.bfloat16), cov, 2, 1.0, 0.01)
    assert a16.dtype == b16.dtype == torch.bfloat16


# -- FoLoRA's refresh ---------------------------------------------------------------------------


def test_mix_estimate_by_hand():
    window, previous = torch.full((2, 2), 4.0, dtype=torch.float64), torch.full((2, 2), 8.0)
    mixed = mix_estimate(window, previous, 0.25)  # 0.25 * 4 + 0.75 * 8 = 7
    torch.testing.assert_close(mixed, torch.full((2, 2), 7.0), atol=0, rtol=0)
    assert mixed.dtype == torch.float32 and mixed.device.type == "cpu"
    whole = mix_estimate(window, None, 1.0)  # mix 1: the window alone, no previous estimate needed
    torch.testing.assert_close(whole, torch.full((2, 2), 4.0), atol=0, rtol=0)
    assert whole.dtype == torch.float32
    nearly = mix_estimate(window, previous, 0.999)
    torch.testing.assert_close(nearly, torch.full((2, 2), 0.999 * 4 + 0.001 * 8), atol=1e-6, rtol=0)


def task_batch(labels_from: int) -> tuple[dict, torch.Tensor]:
    """One sequence of 4 positions; the loss scores positions ``>= labels_from - 1``; inputs x_t = (t+1) e_0 + e_1."""
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100] * labels_from + [1] * (4 - labels_from)])
    x = torch.zeros(1, 4, 2)
    x[0, :, 0] = torch.arange(1.0, 5.0)
    x[0, :, 1] = 1.0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, x


def test_task_window_averages_x_xT_over_loss_positions():
    """labels from position 2: positions 1, 2 count (x = (2, 1), (3, 1)); labels from 3: position 2 only."""
    window = TaskWindow("loss")
    batch, x = task_batch(2)
    window.add_batch({"k": x}, batch)
    assert float(window.counts["k"]) == 2 and window.counts["k"].dtype == torch.float64
    batch2, x2 = task_batch(3)
    window.add_batch({"k": 2 * x2}, batch2)  # (6, 2)
    rows = torch.tensor([[2.0, 1.0], [3.0, 1.0], [6.0, 2.0]])
    assert float(window.counts["k"]) == 3
    estimates = dict(window.pop_estimates())
    assert list(estimates) == ["k"] and window.sums == {} and window.counts == {}
    torch.testing.assert_close(estimates["k"], rows.T @ rows / 3, atol=1e-6, rtol=0)
    all_positions = TaskWindow("all")
    all_positions.add_batch({"k": x}, batch)
    assert float(all_positions.counts["k"]) == 4


def test_balanced_task_window_is_the_mean_of_the_loss_and_all_position_estimates():
    """Loss rows (2, 1), (3, 1), (6, 2) over 3 tokens; all rows: x_t = (t+1, 1), t = 0..3, then 2 x_t, over 8;
    the estimate is the mean of the two second moments, each computed here from its rows in float64."""
    window = TaskWindow("balanced")
    (batch, x), (batch2, x2) = task_batch(2), task_batch(3)
    window.add_batch({"k": x}, batch)
    window.add_batch({"k": 2 * x2}, batch2)
    assert float(window.counts["k@loss"]) == 3 and float(window.counts["k@all"]) == 8
    loss = torch.tensor([[2.0, 1.0], [3.0, 1.0], [6.0, 2.0]], dtype=torch.float64)
    rows = [[t + 1.0, 1.0] for t in range(4)] + [[2 * (t + 1.0), 2.0] for t in range(4)]
    every = torch.tensor(rows, dtype=torch.float64)
    expected = (loss.T @ loss / 3 + every.T @ every / 8) / 2
    state = window.state_dict()
    assert set(state) == {"window_block/k@loss/0", "window_block/k@all/0", "window_count/k@loss", "window_count/k@all"}
    resumed = TaskWindow("balanced")
    resumed.load_state_dict(state, torch.device("cpu"))
    estimates = dict(window.pop_estimates())
    assert list(estimates) == ["k"] and window.sums == {} and window.counts == {}
    torch.testing.assert_close(estimates["k"].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(dict(resumed.pop_estimates())["k"], estimates["k"], atol=0, rtol=0)


def test_task_window_skips_empty_keys_and_round_trips_its_state():
    window = TaskWindow("loss")
    batch, x = task_batch(2)
    window.add_batch({"a": x}, batch)
    window.sums["empty"], window.counts["empty"] = UpperGram(2), torch.zeros((), dtype=torch.float64)
    one = torch.zeros(1, 4, 2)
    one[0, 3] = torch.tensor([2.0, 3.0])  # labels from 3: only position 2 counts, not 3
    one[0, 2] = torch.tensor([1.0, 2.0])
    window.add_batch({"layer/0": one}, task_batch(3)[0])
    state = window.state_dict()
    assert set(state) == {f"window_block/{k}/0" for k in ("a", "empty", "layer/0")} | {
        f"window_count/{k}" for k in ("a", "empty", "layer/0")}  # fmt: skip
    other = TaskWindow("loss")
    other.sums["stale"] = UpperGram(2)
    other.load_state_dict({**state, "window_count/a": torch.tensor(2, dtype=torch.int64)}, torch.device("cpu"))
    assert set(other.sums) == set(other.counts) == {"a", "empty", "layer/0"}  # cleared first; keys may hold "/"
    assert other.counts["a"].dtype == torch.float64 and float(other.counts["a"]) == 2
    estimates = dict(window.pop_estimates())
    assert list(estimates) == ["a", "layer/0"]  # a key without tokens gives no estimate (no 0/0)
    torch.testing.assert_close(estimates["layer/0"], torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # one token: x x^T
    torch.testing.assert_close(dict(other.pop_estimates())["a"], estimates["a"], atol=0, rtol=0)
    assert other.sums == {} and other.counts == {} and dict(other.pop_estimates()) == {}


def test_task_window_holds_upper_blocks_at_real_widths_and_loads_an_old_full_sum():
    """At width 1024 (two row blocks) the window holds 3/4 of n^2 and its estimate is X^T X / N computed
    in float64; a checkpoint's window saved as the full matrix (older ppft) loads to the same estimate."""
    n = 1024
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    window = TaskWindow("all")
    window.add_batch({"k": x}, batch)
    assert sum(b.numel() for b in window.sums["k"].blocks) == 512 * 1024 + 512 * 512
    rows = x.reshape(6, n).double()
    expected = (rows.T @ rows / 6).float()
    old = TaskWindow("all")
    old.load_state_dict({"window_sum/k": expected * 6, "window_count/k": torch.tensor(6.0)}, torch.device("cpu"))
    restored = TaskWindow("all")
    restored.load_state_dict(window.state_dict(), torch.device("cpu"))
    torch.testing.assert_close(dict(window.pop_estimates())["k"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dict(old.pop_estimates())["k"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dict(restored.pop_estimates())["k"], expected, atol=1e-5, rtol=1e-5)


def test_upper_gram_from_blocks_rejects_blocks_of_another_shape():
    with pytest.raises(ValueError, match="not the upper row blocks"):
        UpperGram.from_blocks([torch.zeros(2, 4), torch.zeros(2, 3)])
    gram = UpperGram.from_blocks([torch.ones(2, 4), torch.full((2, 2), 2.0)])
    torch.testing.assert_close(gram.full(), torch.tensor(
        [[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2]]))  # fmt: skip


@pytest.mark.parametrize(
    ("every", "window", "inside"),
    [(0, 4, []), (1, 4, [1, 2, 3, 4, 5, 6, 7, 8]), (4, 2, [3, 4, 7, 8]), (4, 1, [4, 8]), (3, 9, [1, 2, 3, 4, 5, 6, 7, 8]), (5, 5, [1, 2, 3, 4, 5, 6, 7, 8])],
)
def test_in_window_is_the_steps_ending_at_a_refresh(every, window, inside):
    assert [s for s in range(1, 9) if in_window(s, every, window)] == inside


class _Calibration:
    def __init__(self, task: dict[str, torch.Tensor]):
        self.task, self.asked = task, []

    def cov_by_key(self, kind: str, key: str) -> torch.Tensor:
        self.asked.append((kind, key))
        return self.task[key]


def bare_folora(mix: float, task_covs: dict, calibration_task: dict) -> tuple[Folora, list]:
    """A Folora with only what ``refresh`` reads; ``rebase`` records ``(key, C_t)``."""
    method = Folora.__new__(Folora)
    method.options = SimpleNamespace(refresh_mix=mix, refresh_preserve=False)
    method.ctx = SimpleNamespace(calibration=_Calibration(calibration_task))
    method.task_covs, method.refresh_seconds = dict(task_covs), []
    method.window = TaskWindow("all")
    rebased = []
    method.rebase = lambda key, c_t, optimizer: rebased.append((key, c_t.clone(), optimizer))
    return method, rebased


def fill_window(window: TaskWindow, key: str, value: float) -> None:
    window.sums[key] = UpperGram.from_full(torch.full((2, 2), 2 * value))
    window.counts[key] = torch.tensor(2.0, dtype=torch.float64)


def test_refresh_mixes_with_the_calibration_estimate_first_then_its_own_previous():
    method, rebased = bare_folora(0.25, {}, {"x": torch.full((2, 2), 8.0), "y": torch.full((2, 2), 100.0)})
    fill_window(method.window, "x", 4.0)
    optimizer = object()
    method.refresh(optimizer)
    assert [k for k, _, _ in rebased] == ["x"] and method.ctx.calibration.asked == [("task", "x")]
    assert rebased[0][2] is optimizer
    torch.testing.assert_close(rebased[0][1], torch.full((2, 2), 7.0))  # 0.25 * 4 + 0.75 * 8
    torch.testing.assert_close(method.task_covs["x"], torch.full((2, 2), 7.0))
    assert method.window.sums == {} and len(method.refresh_seconds) == 1
    fill_window(method.window, "x", 3.0)
    method.refresh(optimizer=None)  # now the previous refresh's C_t (7), not the calibration's (8)
    torch.testing.assert_close(rebased[1][1], torch.full((2, 2), 0.25 * 3 + 0.75 * 7))
    assert method.ctx.calibration.asked == [("task", "x")]
    assert len(method.refresh_seconds) == 2 and all(0 <= t < 3600 for t in method.refresh_seconds)  # durations


def test_refresh_with_mix_1_uses_the_window_alone_and_keeps_no_estimates():
    method, rebased = bare_folora(1.0, {}, {})
    fill_window(method.window, "x", 4.0)
    method.refresh(optimizer=None)
    torch.testing.assert_close(rebased[0][1], torch.full((2, 2), 4.0))
    assert method.task_covs == {} and method.ctx.calibration.asked == []


@pytest.mark.parametrize("value", [None, 1, 3, 0.5, 1e-9])
def test_count_or_fraction_accepts_positive_values(value):
    assert _count_or_fraction(value) == value


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, True, False])
def test_count_or_fraction_rejects_non_positive_values_and_bools(value):
    with pytest.raises(ValueError, match=r"^must be positive: a fraction \(< 1\) or a count \(>= 1\)$"):
        _count_or_fraction(value)


def test_folora_options_check_keep_and_hard_k():
    assert FoloraOptions(keep=0.5, hard_k=2).keep == 0.5
    for field in ("keep", "hard_k"):
        with pytest.raises(ValueError, match=f"{field}[\\s\\S]*must be positive"):
            FoloraOptions(**{field: 0})


# -- FORA's W_0 ---------------------------------------------------------------------------------


def bare_fora(form: str, anchors: dict) -> Fora:
    method = Fora.__new__(Fora)
    method.options = ForaOptions(form=form)
    method.anchors, method.w0 = anchors, {}
    method.layers = {
        name: SimpleNamespace(base=SimpleNamespace(weight=torch.full((2, 3), value)), added_weight=lambda: torch.zeros(2, 3))
        for name, value in (("a", 1.0), ("b", 2.0))
    }
    return method


def test_track_weight_deltas_takes_w0_from_the_anchors_when_there_are_any():
    anchor = torch.full((2, 3), 5.0)
    method = bare_fora("full", {"a": anchor})
    method.track_weight_deltas()
    assert method.w0["a"] is anchor  # shared with the decay anchor: one copy of W_0
    torch.testing.assert_close(method.w0["b"], torch.full((2, 3), 2.0))
    assert method.w0["b"] is not method.layers["b"].base.weight  # a copy, not the live weight
    method.layers["b"].base.weight.add_(1.0)
    torch.testing.assert_close(method.weight_deltas()["b.weight"], torch.ones(2, 3))
    torch.testing.assert_close(method.weight_deltas()["a.weight"], torch.full((2, 3), -4.0))
    method.track_weight_deltas()  # a second call keeps the first W_0
    torch.testing.assert_close(method.w0["b"], torch.full((2, 3), 2.0))


def test_track_weight_deltas_keeps_nothing_in_the_lora_form():
    method = bare_fora("lora", {})
    method.track_weight_deltas()
    assert method.w0 == {}
    assert set(method.weight_deltas()) == {"a.weight", "b.weight"}
