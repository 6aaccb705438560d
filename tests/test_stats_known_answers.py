"""Input second moments (``calibration/stats.py``) against float64 sums written out by hand.

A toy model whose layer inputs are known in closed form replaces the tiny Llama: ``h = E[ids] +
masked mean of E[ids] over the row`` feeds ``a`` and ``b`` (one shared input), ``c`` (a GPT-2 style
``Conv1D``, weight [in, out], no ``in_features``) reads ``a(h)``, and ``head`` comes last. Widths
differ (3 and 5) so a transposed shape or a swapped dimension shows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from preserve_core.calibration.dist import Dist
from preserve_core.calibration.layout import InputLayout
from preserve_core.calibration.gram import (
    GRAM_BLOCK_ROWS,
    MAX_GRAM_BLOCKS,
    UpperGram,
    fill_lower,
    gram_blocks,
    pack_upper,
    unpack_symmetric,
    upper_mask,
)
from preserve_core.calibration.stats import (
    _Accumulator,
    _forward,
    _StopForward,
    accumulate_input_stats,
    collect_input_stats,
    input_dims,
    select_rows,
    token_mask,
)
from preserve_core.errors import PPFTError

NAMES = ["a", "b", "c"]


class ToyLM(nn.Module):
    """``h`` [B, T, 3] -> a (3 -> 5), b (3 -> 2) on the same ``h``; c (Conv1D 5 -> 4) on ``a(h)``; head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=9)
        self.emb = nn.Embedding(9, 3)
        self.a, self.b = nn.Linear(3, 5, bias=False), nn.Linear(3, 2, bias=False)
        self.c = Conv1D(4, 5)
        self.head = nn.Linear(4, 9)
        self.head_calls = 0
        self.head.register_forward_pre_hook(lambda m, args: setattr(self, "head_calls", self.head_calls + 1))

    def hidden(self, input_ids, attention_mask=None):
        """``h_t = E[id_t] + sum_s m_s E[id_s] / sum_s m_s`` (m: attention mask, all ones if None)."""
        e = self.emb(input_ids)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m.to(e.dtype)[..., None]
        return e + (e * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        if use_cache is not False:  # a statistics pass never asks for a KV cache
            raise AssertionError(f"use_cache={use_cache!r}")
        h = self.hidden(input_ids, attention_mask)
        self.b(h)
        return self.head(self.c(self.a(h)))


def toy_batches() -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches (pad id 0); prompt tokens (first two) have label -100."""
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, width, lengths in ((2, 5, (5, 3)), (3, 4, (2, 4, 3))):
        ids = torch.randint(1, 9, (rows, width), generator=g)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[:, :2] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def reference(model: ToyLM, batches, positions: str) -> dict[str, tuple[torch.Tensor, int]]:
    """``{key: (S = sum x x^T in float64, N)}`` from the toy's closed form, masking by hand."""
    sums = {"{a,b}": torch.zeros(3, 3, dtype=torch.float64), "c": torch.zeros(5, 5, dtype=torch.float64)}
    count = 0
    with torch.no_grad():
        for batch in batches:
            ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            h = model.hidden(ids, attn).double()
            y = h @ model.a.weight.double().T
            for i in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    scored = t + 1 < ids.shape[1] and labels[i, t + 1] != -100
                    if attn[i, t] == 1 and (positions == "all" or scored):
                        sums["{a,b}"] += torch.outer(h[i, t], h[i, t])
                        sums["c"] += torch.outer(y[i, t], y[i, t])
                        count += 1
    return {k: (s, count) for k, s in sums.items()}


@pytest.mark.parametrize("positions", ["loss", "all"])
def test_accumulated_sums_counts_and_dims_by_hand(positions):
    model = ToyLM()
    stats = accumulate_input_stats(model, NAMES, toy_batches(), positions=positions)
    expected = reference(model, toy_batches(), positions)
    assert stats.layout.keys == ["{a,b}", "c"]
    assert stats.layout.module_to_key == {"a": "{a,b}", "b": "{a,b}", "c": "c"}
    assert stats.dims() == {"{a,b}": 3, "c": 5}
    assert stats.counts == {"{a,b}": expected["c"][1], "c": expected["c"][1]}
    assert expected["c"][1] == (7 if positions == "loss" else 17)  # loss: 3 + 1 + 0 + 2 + 1 positions; all: 5 + 3 + 2 + 4 + 3
    for key, (total, _) in expected.items():
        assert {b.dtype for b in stats.sums[key].blocks} == {torch.float32}
        torch.testing.assert_close(stats.sums[key].full().double(), total, rtol=1e-5, atol=1e-5)
    assert model.head_calls == 1  # the probe pass; the statistics passes stop after ``c``


def test_covariances_divide_by_the_count_and_share_objects():
    """``collect_input_stats`` (default positions: loss): C = S / N; a and b get one tensor object."""
    model = ToyLM()
    stats = collect_input_stats(model, NAMES, toy_batches())
    expected = reference(model, toy_batches(), "loss")
    assert set(stats) == set(NAMES) and stats["a"][0] is stats["b"][0] and stats["c"][0] is not stats["a"][0]
    for name, key in (("a", "{a,b}"), ("c", "c")):
        cov, count = stats[name]
        assert count == 7 and cov.shape == expected[key][0].shape
        torch.testing.assert_close(cov.double(), expected[key][0] / 7, rtol=1e-5, atol=1e-6)


def test_one_selected_token_divides_by_one_and_none_by_nothing():
    """N = 1: C = x x^T exactly (not halved); N = 0: C = 0, not NaN (the divisor is max(N, 1))."""
    model = ToyLM()
    ids = torch.tensor([[3, 4, 5]])
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, 5]])}
    none = {**one, "labels": torch.full_like(ids, -100)}
    h = model.hidden(ids).detach().double()[0, 1]
    stats = accumulate_input_stats(model, NAMES, [one])
    torch.testing.assert_close(stats.into_covs()["{a,b}"].double(), torch.outer(h, h), rtol=1e-5, atol=1e-6)
    packed = accumulate_input_stats(model, NAMES, [one]).pop_packed_covs()
    torch.testing.assert_close(packed["{a,b}"].double(), pack_upper(torch.outer(h, h)), rtol=1e-5, atol=1e-6)
    empty = accumulate_input_stats(model, NAMES, [none])
    assert empty.counts == {"{a,b}": 0, "c": 0}
    assert torch.equal(empty.into_covs()["c"], torch.zeros(5, 5))


def test_packed_covariances_pop_each_sum():
    model = ToyLM()
    stats = accumulate_input_stats(model, NAMES, toy_batches(), positions="all")
    expected = reference(model, toy_batches(), "all")
    packed = stats.pop_packed_covs()
    assert stats.sums == {} and list(packed) == ["{a,b}", "c"]
    for key, (total, count) in expected.items():
        assert packed[key].device == torch.device("cpu") and packed[key].dtype == torch.float32
        torch.testing.assert_close(packed[key].double(), pack_upper(total) / count, rtol=1e-5, atol=1e-6)


def test_without_early_stop_the_whole_model_runs_and_stats_agree():
    model = ToyLM()
    late = accumulate_input_stats(model, NAMES, toy_batches(), stop_early=False)
    assert model.head_calls == 1 + 2  # probe + both batches ran to the head
    early = accumulate_input_stats(model, NAMES, toy_batches())
    assert model.head_calls == 1 + 2 + 1  # probe only
    for key in early.sums:
        assert torch.equal(early.sums[key].full(), late.sums[key].full())


def test_each_rank_takes_every_world_th_batch_and_sums_are_reduced():
    """Rank 1 of 2 reads batches 1 and 3; the (fake) all-reduce doubles sums and counts."""

    def reduce(tensor, reduction):
        assert reduction == "sum"
        return tensor * 2

    model = ToyLM()
    batches = toy_batches() * 2  # indices 0..3: rank 1 gets 1 and 3 (both the second batch)
    accelerator = SimpleNamespace(process_index=1, num_processes=2, reduce=reduce)
    stats = accumulate_input_stats(model, NAMES, batches, positions="all", dist=Dist(accelerator))
    second = reference(model, [batches[1], batches[3]], "all")
    assert stats.counts == {"{a,b}": 4 * 9, "c": 4 * 9} and all(type(c) is int for c in stats.counts.values())
    for key, (total, _) in second.items():
        torch.testing.assert_close(stats.sums[key].full().double(), 2 * total, rtol=1e-5, atol=1e-5)


def test_collect_input_stats_reduces_over_the_accelerators_ranks():
    """``collect_input_stats(..., accelerator=...)``: rank 0 of 2 reads batch 0 of 2; the fake all-reduce doubles."""

    def reduce(tensor, reduction):
        return tensor * 2

    model = ToyLM()
    accelerator = SimpleNamespace(process_index=0, num_processes=2, reduce=reduce)
    stats = collect_input_stats(model, NAMES, toy_batches(), positions="all", accelerator=accelerator)
    first = reference(model, toy_batches()[:1], "all")
    for name, key in (("b", "{a,b}"), ("c", "c")):
        cov, count = stats[name]
        assert count == 2 * 8
        torch.testing.assert_close(cov.double(), first[key][0] / 8, rtol=1e-5, atol=1e-6)


def test_float32_sums_under_a_float64_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = ToyLM()
        stats = accumulate_input_stats(model, NAMES, toy_batches(), positions="all")
    finally:
        torch.set_default_dtype(default)
    assert {b.dtype for s in stats.sums.values() for b in s.blocks} == {torch.float32}


def test_input_dims_from_in_features_or_weight_rows():
    model = ToyLM()
    layout = InputLayout(["{a,b}", "c"], {"a": "{a,b}", "b": "{a,b}", "c": "c"}, {}, None)
    assert input_dims(model, layout) == {"{a,b}": 3, "c": 5}
    model.c = nn.Identity()
    with pytest.raises(PPFTError) as err:
        input_dims(model, layout)
    assert str(err.value) == "cannot tell the input width of target layer c"


# ---------------------------------------------------------------------------------------------
# the hooks' accumulator
# ---------------------------------------------------------------------------------------------
def _accumulator(stop_after=None) -> _Accumulator:
    layout = InputLayout(["k1", "k2"], {"p": "k1", "q": "k1", "r": "k2"}, {"p": 1, "q": 1, "r": 1}, stop_after)
    return _Accumulator(layout, ["k1", "k2"], {"k1": 2, "k2": 2}, torch.device("cpu"), stop_after)


def test_a_shared_tensor_is_added_once_a_new_one_again():
    acc = _accumulator()
    assert acc.sums["k1"].n == 2 and acc.counts == {"k1": 0, "k2": 0} and acc.calls == {"p": 0, "q": 0, "r": 0}
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]
    acc.new_forward(torch.tensor([[True, False]]))
    acc.hook("p", x)
    acc.hook("q", x)  # the same object: already added
    assert acc.counts["k1"] == 1 and torch.equal(acc.sums["k1"].full(), torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    acc.hook("q", x.clone())  # another tensor: added again
    assert acc.counts["k1"] == 2 and acc.calls == {"p": 1, "q": 2, "r": 0}
    acc.new_forward(torch.tensor([[True, True]]))  # a new pass forgets what it saw
    acc.hook("p", x)
    assert acc.counts["k1"] == 4 and acc.calls == {"p": 1, "q": 0, "r": 0}
    torch.testing.assert_close(acc.sums["k1"].full(), torch.tensor([[12.0, 18.0], [18.0, 28.0]]))


def test_a_tensor_read_by_another_key_is_an_error_naming_both():
    acc = _accumulator()
    x = torch.ones(1, 1, 2)
    acc.new_forward(torch.ones(1, 1, dtype=torch.bool))
    acc.hook("p", x)
    with pytest.raises(PPFTError) as err:
        acc.hook("r", x)
    assert str(err.value) == "input of k2 is also read by k1, which the probe pass did not show"


def test_the_pass_stops_at_the_n_th_call_of_the_last_layer():
    acc = _accumulator(stop_after=("q", 2))
    acc.new_forward(torch.ones(1, 1, dtype=torch.bool))
    acc.hook("q", torch.ones(1, 1, 2))  # first call: no stop
    with pytest.raises(_StopForward):
        acc.hook("q", torch.ones(1, 1, 2))
    assert acc.counts["k1"] == 2
    late = _accumulator(stop_after=None)
    late.new_forward(torch.ones(1, 1, dtype=torch.bool))
    late.hook("q", torch.ones(1, 1, 2))  # no stop point: no stop


def test_forward_swallows_the_stop_and_clears_the_mask():
    model = ToyLM()
    layout = InputLayout(["{a,b}", "c"], {"a": "{a,b}", "b": "{a,b}", "c": "c"}, {}, ("a", 1))
    acc = _Accumulator(layout, ["{a,b}", "c"], {"{a,b}": 3, "c": 5}, torch.device("cpu"), ("a", 1))
    handle = model.a.register_forward_pre_hook(lambda m, args: acc.hook("a", args[0]))
    ids = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[1, 1, 0]])
    try:
        _forward(model, acc, {"input_ids": ids, "attention_mask": mask}, "all")
    finally:
        handle.remove()
    h = model.hidden(ids, mask).detach().double()[0, :2]
    torch.testing.assert_close(acc.sums["{a,b}"].full().double(), h.T @ h, rtol=1e-5, atol=1e-6)
    assert acc.counts == {"{a,b}": 2, "c": 0} and acc.mask is None and acc.seen == {} and model.head_calls == 0


# ---------------------------------------------------------------------------------------------
# masks, rows, Gram blocks, packing
# ---------------------------------------------------------------------------------------------
def test_token_mask_without_attention_mask_and_errors():
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    labels = torch.tensor([[-100, 6, -100], [-100, -100, 1]])
    assert token_mask({"input_ids": ids}, "all").tolist() == [[True] * 3, [True] * 3]
    assert token_mask({"input_ids": ids}, "all").dtype == torch.bool
    assert token_mask({"input_ids": ids, "labels": labels}, "loss").tolist() == [[True, False, False], [False, True, False]]
    attention = torch.tensor([[1, 1, 1], [1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    assert token_mask(batch, "loss").tolist() == [[True, False, False], [False, False, False]]
    assert token_mask(batch, "all").tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError) as err:
        token_mask(batch, "every")
    assert str(err.value) == "positions must be 'loss' or 'all', not 'every'"
    with pytest.raises(PPFTError) as err:
        token_mask({"input_ids": ids}, "loss")
    assert str(err.value) == "task statistics over loss positions need 'labels' in each batch"


def test_select_rows_shapes_and_dtype():
    x = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)  # [B=2, T=3, n=2]
    mask = torch.tensor([[True, False, True], [False, True, False]])
    rows = select_rows(x, mask)
    assert rows.dtype == torch.float32 and rows.tolist() == [[0, 1], [4, 5], [8, 9]]
    full = select_rows(x.to(torch.bfloat16), torch.ones(2, 3, dtype=torch.bool))
    assert full.dtype == torch.float32 and full.shape == (6, 2) and full[5].tolist() == [10, 11]
    flat = select_rows(x.reshape(6, 2), mask)  # [B*T, n] (layers that flatten the batch)
    assert flat.tolist() == [[0, 1], [4, 5], [8, 9]]
    with pytest.raises(PPFTError) as err:
        select_rows(torch.zeros(5, 2), mask)
    assert str(err.value) == "a target layer's input has shape (5, 2), which does not match the batch (2, 3)"
    with pytest.raises(PPFTError):
        select_rows(torch.zeros(2, 3, 2, 2), mask)  # [B, T, ...] not [B, T, n]


def test_gram_blocks_by_rounding():
    assert (GRAM_BLOCK_ROWS, MAX_GRAM_BLOCKS) == (512, 8)
    cases = {0: 1, 100: 1, 767: 1, 768: 2, 1280: 2, 1800: 4, 4096: 8, 100_000: 8}  # round(n / 512), 1..8
    assert {n: gram_blocks(n) for n in cases} == cases


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(6, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


@pytest.mark.parametrize("n, blocks", [(128, 2), (130, 3)])
def test_blocked_gram_holds_only_the_block_upper_part(n, blocks):
    """Block j is ``X^T X [e_j:e_{j+1}, e_j:]`` ([h_j, n - e_j]); nothing below the block diagonal is held."""
    x = _rows(n)
    gram = UpperGram(n, blocks=blocks)
    gram.add_(x)
    gram.add_(x)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    full = 2 * x.double().T @ x.double()
    assert len(gram.blocks) == blocks
    for (lo, hi), block in zip(zip(edges[:-1], edges[1:], strict=True), gram.blocks, strict=True):
        assert block.shape == (hi - lo, n - lo)
        torch.testing.assert_close(block.double(), full[lo:hi, lo:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, blocks", [(127, 4), (128, None), (128, 1), (200, 0)])
def test_narrow_or_single_block_gram_is_the_full_product(n, blocks):
    x = _rows(n)
    gram = UpperGram(n, blocks=blocks)
    gram.add_(x)
    assert len(gram.blocks) == 1
    torch.testing.assert_close(gram.blocks[0].double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-5)


def test_fill_lower_in_place_and_upper_mask():
    acc = torch.tensor([[1.0, 2.0, 3.0], [9.0, 4.0, 5.0], [9.0, 9.0, 6.0]])
    assert fill_lower(acc) is acc
    assert acc.tolist() == [[1, 2, 3], [2, 4, 5], [3, 5, 6]]
    mask = upper_mask(3)
    assert mask.dtype == torch.bool and mask.device == torch.device("cpu")
    assert mask.tolist() == [[True, True, True], [False, True, True], [False, False, True]]


def test_unpack_symmetric_by_hand():
    packed = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)  # rows (1 2 3) (4 5) (6)
    out = unpack_symmetric(packed, 3)
    assert out.dtype == torch.float64 and out.tolist() == [[1, 2, 3], [2, 4, 5], [3, 5, 6]]
    assert pack_upper(out).tolist() == packed.tolist()
    full = torch.eye(3)
    assert unpack_symmetric(full, 3) is full
    with pytest.raises(ValueError) as err:
        unpack_symmetric(packed, 4)
    assert str(err.value) == "a packed triangle of width 4 has 10 entries, not 6"
