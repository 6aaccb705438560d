"""Calibration: exact statistics, shared inputs, padding, seeded sampling, filters, storage, reuse, CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from preserve_core.calibration import (
    collect_input_stats,
    effective_ranks,
    ensure_calibration,
    load_calibration,
    run_calibration,
    token_mask,
)
from preserve_core.calibration.layout import discover_layout, group_key
from preserve_core.calibration.sampling import degenerate_reason, sample_preserve_texts
from preserve_core.calibration.dist import Dist
from preserve_core.calibration.gram import UpperGram, fill_lower, pack_upper, unpack_symmetric, upper_gram_bytes
from preserve_core.calibration.stats import accumulate_input_stats, input_dims, plan_passes, stats_budget_bytes
from preserve_core.errors import PPFTError, RecipeError
from preserve_core.methods import METHODS
from preserve_core.methods.base import PRESERVE_STATS, TASK_STATS
from preserve_core.methods.lora import Lora
from preserve_core.models import resolve_target_modules
from preserve_core.recipe import load_recipe
from preserve_core.recipe_schema import CalibrationConfig

REPO = Path(__file__).resolve().parents[1]
FAST = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 10, "min_new_tokens": 1, "stats_batch_size": 8,
        "max_task_examples": 24}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def wide_model():
    """One layer of width 128 / MLP 320: wide enough for the blocked Gram update."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=44, hidden_size=128, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows, two of them right-padded; the first four tokens of each row are 'prompt'."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def captured_inputs(model, names, batch) -> dict[str, torch.Tensor]:
    """Every target layer's input [B, T, n] in float64, captured by independent hooks."""
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].double()))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def test_token_mask_positions():
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 6, 7, 2, -100]]),
    }
    # loss: positions whose *next* label is scored (last prompt token .. last completion token)
    assert token_mask(batch, "loss").tolist() == [[False, True, True, True, False, False]]
    assert token_mask(batch, "all").tolist() == [[True, True, True, True, True, False]]


@pytest.mark.parametrize("positions", ["all", "loss"])
@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_stats_equal_float64_reference(model_and_tokenizer, wide_model, positions, which):
    model = model_and_tokenizer[0] if which == "tiny" else wide_model
    names = resolve_target_modules(model, None)
    batch = padded_batch()
    inputs = captured_inputs(model, names, batch)
    mask = token_mask(batch, positions)
    stats = collect_input_stats(model, names, [batch], positions=positions)
    for name in names:
        x = inputs[name][mask]  # [N, n]: padding and unselected positions excluded
        reference = x.T @ x / x.shape[0]
        cov, count = stats[name]
        assert count == int(mask.sum())
        assert cov.dtype == torch.float32 and cov.shape == reference.shape
        torch.testing.assert_close(cov.double(), reference, rtol=1e-5, atol=1e-6)


def test_shared_inputs_share_one_matrix(model_and_tokenizer):
    model, _ = model_and_tokenizer
    names = resolve_target_modules(model, None)
    stats = collect_input_stats(model, names, [padded_batch()], positions="all")
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats[attn + "q_proj"][0] is stats[attn + "k_proj"][0] is stats[attn + "v_proj"][0]
    assert stats[mlp + "gate_proj"][0] is stats[mlp + "up_proj"][0]
    assert stats[attn + "o_proj"][0] is not stats[attn + "q_proj"][0]
    assert stats[mlp + "down_proj"][0] is not stats[mlp + "up_proj"][0]
    assert len({id(c) for c, _ in stats.values()}) == 4 * model.config.num_hidden_layers
    layout = discover_layout(model, names, torch.device("cpu"))
    assert layout.module_to_key[attn + "v_proj"] == attn + "{q_proj,k_proj,v_proj}"
    assert layout.module_to_key[mlp + "up_proj"] == mlp + "{gate_proj,up_proj}"


def test_padding_does_not_change_stats_and_lm_head_is_skipped(model_and_tokenizer):
    model, _ = model_and_tokenizer
    names = resolve_target_modules(model, ["o_proj", "down_proj"])
    batch = padded_batch()
    rows = [{k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()} for i in range(3)]
    head_calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1))
    try:
        together = collect_input_stats(model, names, [batch], positions="loss")
    finally:
        handle.remove()
    separate = collect_input_stats(model, names, rows, positions="loss")
    for name in names:
        torch.testing.assert_close(together[name][0], separate[name][0], rtol=1e-5, atol=1e-6)
        assert together[name][1] == separate[name][1]
    assert len(head_calls) == 1  # the probe pass only: the statistics pass stops after the last target


@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_upper_gram_blocks_hold_the_triangle_of_the_full_product(blocks):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n_rows, 203, generator=g) for n_rows in (50, 17)]  # width not divisible by blocks
    gram = UpperGram(203, blocks=blocks)
    for x in chunks:
        gram.add_(x)
    full = torch.cat(chunks).double()
    reference = full.T @ full
    torch.testing.assert_close(gram.full().double(), reference, rtol=1e-5, atol=1e-4)
    # by hand: edges round(i * 203 / b); block j is [h_j, 203 - e_j]
    floats = {1: 203 * 203, 3: 68 * 203 + 67 * 135 + 68 * 68, 4: 51 * 203 + 51 * 152 + 50 * 101 + 51 * 51}[blocks]
    assert gram.nbytes() == upper_gram_bytes(203, blocks) == 4 * floats
    expected_packed = torch.cat([reference[i, i:] for i in range(203)])
    torch.testing.assert_close(gram.pop_packed().double(), expected_packed, rtol=1e-5, atol=1e-4)
    assert gram.blocks == [] and gram.nbytes() == 0  # emptied as it was packed


def test_upper_gram_bytes_at_real_widths():
    """8 blocks of 512 rows at width 4096: sum_j 512 (4096 - 512 j) = 9/16 of 4096^2; narrow inputs: n^2."""
    assert upper_gram_bytes(4096) == 4 * 4096 * 4096 * 9 // 16
    assert upper_gram_bytes(14336) == 4 * 14336 * 14336 * 9 // 16  # 8 blocks of 1792 rows
    assert upper_gram_bytes(100) == 4 * 100 * 100


def test_packed_triangle_round_trip_and_fill_lower():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g)
    full = x.T @ x
    packed = pack_upper(full)
    # by hand: row i of the upper triangle is full[i, i:], rows concatenated
    expected = torch.cat([full[i, i:] for i in range(7)])
    assert packed.shape == (7 * 8 // 2,) and torch.equal(packed, expected)
    assert torch.equal(unpack_symmetric(packed, 7), torch.triu(full) + torch.triu(full, 1).T)
    garbage_below = torch.triu(full) + torch.tril(torch.full((7, 7), 99.0), -1)
    assert torch.equal(fill_lower(garbage_below), torch.triu(full) + torch.triu(full, 1).T)
    with pytest.raises(ValueError, match="width 6"):
        unpack_symmetric(packed, 6)


def test_plan_passes_cuts_forward_order_by_budget(model_and_tokenizer):
    """Tiny model: per layer inputs of width 32 (attention), 32 (o_proj), 32 (MLP), 64 (down_proj), all
    narrower than 128 so each sum is a full n^2 block: 4096, 4096, 4096 and 16384 bytes."""
    model, _ = model_and_tokenizer
    names = resolve_target_modules(model, None)
    layout = discover_layout(model, names, torch.device("cpu"))
    dims = input_dims(model, layout)
    assert [dims[k] for k in layout.keys] == [32, 32, 32, 64] * 2
    assert [upper_gram_bytes(dims[k]) for k in layout.keys[:4]] == [4096, 4096, 4096, 16384]
    keys = layout.keys  # target order is forward order here
    assert plan_passes(layout, dims, None) == [keys]
    assert plan_passes(layout, dims, 10**9) == [keys]
    assert plan_passes(layout, dims, 8192) == [keys[0:2], keys[2:3], keys[3:4], keys[4:6], keys[6:7], keys[7:8]]
    assert plan_passes(layout, dims, 1) == [[k] for k in keys]  # a key wider than the budget: alone
    assert plan_passes(layout, dims, 28672) == [keys[0:4], keys[4:8]]


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_grouped_passes_give_the_same_stats_and_stop_early(model_and_tokenizer, wide_model, which):
    """Any budget: bitwise the same sums (the same updates per key) as one pass, equal to a float64
    Gram of the captured inputs; each pass goes only as deep as its last layer."""
    model = model_and_tokenizer[0] if which == "tiny" else wide_model
    names = resolve_target_modules(model, None)
    batches = [padded_batch(), {k: v[:2] for k, v in padded_batch().items()}]
    inputs = [captured_inputs(model, names, b) for b in batches]
    first, last = names[0], names[-1]
    calls = {first: 0, last: 0}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]  # fmt: skip
    try:
        one = accumulate_input_stats(model, names, batches, "loss")
        assert calls == {first: 1 + 2, last: 1 + 2}  # probe + one pass over two batches
        calls.update({first: 0, last: 0})
        split = accumulate_input_stats(model, names, batches, "loss", budget_bytes=1)
    finally:
        for h in hooks:
            h.remove()
    passes = len(one.layout.keys)
    assert calls == {first: 1 + 2 * passes, last: 1 + 2}  # every pass runs layer 0; only the last reaches the end
    for key in one.layout.keys:
        assert torch.equal(one.sums[key].full(), split.sums[key].full())
        assert one.counts[key] == split.counts[key]
    for name, key in one.layout.module_to_key.items():
        x = torch.cat([inp[name][token_mask(b, "loss")] for inp, b in zip(inputs, batches, strict=True)])
        torch.testing.assert_close(split.sums[key].full().double(), x.T @ x, rtol=1e-5, atol=1e-5)
        assert split.counts[key] == x.shape[0]


def test_stats_budget_bytes(monkeypatch):
    assert stats_budget_bytes(2.5, torch.device("cpu")) == 2_500_000_000
    assert stats_budget_bytes(None, torch.device("cpu")) is None  # no limit off CUDA: one pass
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8_000_000_000, 80_000_000_000))
    assert stats_budget_bytes(None, torch.device("cuda", 0), Dist()) == 6_000_000_000  # 3/4 of the free memory


def test_group_key_and_effective_ranks():
    assert group_key(["a.b.q", "a.b.k"]) == "a.b.{q,k}"
    assert group_key(["x.y"]) == "x.y"
    cov = torch.diag(torch.tensor([8.0, 1.0, 0.5, 0.5]))  # energy: 0.8, 0.9, 0.95, 1.0
    assert effective_ranks(cov, (0.5, 0.9, 0.95, 0.99)) == [1, 2, 3, 4]
    assert effective_ranks(torch.zeros(3, 3)) == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = CalibrationConfig(num_samples=6, batch_size=3, max_new_tokens=8, min_new_tokens=0, max_repeat_fraction=1.0)
    torch.manual_seed(123)
    first, report = sample_preserve_texts(model, tokenizer, cfg)
    state_after = torch.random.get_rng_state()
    again, _ = sample_preserve_texts(model, tokenizer, cfg)
    other, _ = sample_preserve_texts(model, tokenizer, cfg.model_copy(update={"seed": 1}))
    assert [s.text for s in first] == [s.text for s in again]
    assert [s.ids for s in first] == [s.ids for s in again]
    assert [s.ids for s in first] != [s.ids for s in other]
    assert report.attempted == 6 and report.kept == 6
    torch.manual_seed(123)
    assert torch.equal(torch.random.get_rng_state(), state_after)  # the caller's RNG stream is untouched
    assert all(s.ids[0] == tokenizer.bos_token_id and len(s.ids) <= 1 + 8 for s in first)


def test_sampling_start_modes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    base = {"num_samples": 6, "batch_size": 3, "max_new_tokens": 4, "min_new_tokens": 0, "max_repeat_fraction": 1.0}
    prompts = CalibrationConfig(**base, start="prompts", seed_prompts=["abc", "xy"])
    samples, _ = sample_preserve_texts(model, tokenizer, prompts)
    for i, sample in enumerate(samples):  # prompts cycle by sample slot, across batches
        prompt = tokenizer(["abc", "xy"][i % 2], add_special_tokens=False)["input_ids"]
        assert sample.ids[: 1 + len(prompt)] == [tokenizer.bos_token_id, *prompt]
    uniform, _ = sample_preserve_texts(model, tokenizer, CalibrationConfig(**base, start="uniform"))
    firsts = [s.ids[1] for s in uniform]
    assert len(set(firsts)) > 1 and not set(firsts) & set(tokenizer.all_special_ids)


def test_degenerate_filter():
    assert degenerate_reason([5, 6, 7, 8], "abcd", 4, 0.5) is None
    assert degenerate_reason([5, 6, 7], "abc", 4, 0.5) == "short"
    assert degenerate_reason([5, 5, 5, 6], "aaab", 4, 0.5) == "repetitive"
    assert degenerate_reason([5, 5, 6, 7], "aabc", 4, 0.5) is None  # exactly half is allowed
    assert degenerate_reason([3, 3, 3, 3], "  ", 0, 1.0) == "empty"


def test_sampling_filter_drops_and_reports(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = CalibrationConfig(num_samples=6, batch_size=6, max_new_tokens=6, min_new_tokens=0, max_repeat_fraction=1.0)
    everything, _ = sample_preserve_texts(model, tokenizer, cfg)
    strict = cfg.model_copy(update={"max_repeat_fraction": 0.2})  # any token twice in 6 is too many
    passing = [s.ids for s in everything if degenerate_reason(s.new_ids, s.text, 0, 0.2) is None]
    assert 0 < len(passing) < len(everything)  # this seed draws both kinds
    survivors, report = sample_preserve_texts(model, tokenizer, strict)
    assert [s.ids for s in survivors][: len(passing)] == passing  # same draws, filtered
    assert report.dropped["repetitive"] >= len(everything) - len(passing)
    assert report.attempted == report.kept + sum(report.dropped.values())
    with pytest.raises(PPFTError, match="no usable sample"):
        sample_preserve_texts(model, tokenizer, cfg.model_copy(update={"min_new_tokens": 7}))


# ---------------------------------------------------------------------------------------------
# the calibration folder
# ---------------------------------------------------------------------------------------------
class ExtraLora(Lora):
    """A method with its own calibration extras (stands in for EWC / KL) that reads C_p and C_t."""

    name = "extra_lora"
    needs = frozenset({PRESERVE_STATS, TASK_STATS})

    @classmethod
    def calibrate_extra(cls, model, tokenizer, preserve_texts, recipe):
        return {"n_texts": torch.tensor([len(preserve_texts)])}


class FailingLora(Lora):
    name = "failing_lora"

    @classmethod
    def calibrate_extra(cls, model, tokenizer, preserve_texts, recipe):
        raise RuntimeError("boom")


def test_run_save_load_and_reuse(write_recipe, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(write_recipe(calibration=FAST))
    cal = run_calibration(recipe, model, tokenizer, ExtraLora)
    assert cal.dir == recipe.calibration_dir() and not cal.reused
    lines = [json.loads(line) for line in (cal.dir / "preserve.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == cal.preserve_texts and len(lines) == 8
    sidecar = json.loads((cal.dir / "preserve.json").read_text())
    assert sidecar["model_fingerprint"] == cal.manifest["model_fingerprint"] and sidecar["settings"]["seed"] == 0
    q, k = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
    assert cal.input_key(q) == cal.input_key(k)
    cp, ct = cal.preserve_cov(q), cal.task_cov(q)
    assert cp.shape == (32, 32) and cp.dtype == torch.float32 and torch.allclose(cp, cp.T)
    assert not torch.allclose(cp, ct)
    counts = cal.token_counts()
    assert counts["preserve"] == sum(len(line["ids"]) for line in lines) and counts["task"] > 0
    assert cal.extra("extra_lora")["n_texts"].item() == 8
    assert len(load_file(cal.dir / "preserve_stats.safetensors")) == 8  # one matrix per distinct input
    assert ensure_calibration(recipe, model, tokenizer, ExtraLora).reused
    changed = load_recipe(write_recipe(calibration={**FAST, "seed": 3}))
    assert not ensure_calibration(changed, model, tokenizer, ExtraLora).reused


def test_memory_budget_gives_the_same_folder_and_keeps_its_identity(write_recipe, model_and_tokenizer, capsys):
    """stats_memory_gb small enough for one input at a time: the same C_p and C_t files, bit for bit, and
    the same identity (the budget is not a setting the output depends on), so the default run reuses it."""
    model, tokenizer = model_and_tokenizer
    one = run_calibration(load_recipe(write_recipe("one", calibration=FAST)), model, tokenizer, Lora, stats=["preserve", "task"])
    assert "passes over the data" not in capsys.readouterr().err
    budget = {**FAST, "stats_memory_gb": 5e-6, "dir": str(one.dir.parent / "split")}  # 5000 bytes: one input (<= 16384)
    split = run_calibration(load_recipe(write_recipe("split", calibration=budget)), model, tokenizer, Lora,
                            stats=["preserve", "task"])  # fmt: skip
    assert "8 passes over the data per statistic" in capsys.readouterr().err.replace("\n", "")
    for name in ("preserve_stats.safetensors", "task_stats.safetensors"):
        left, right = load_file(one.dir / name), load_file(split.dir / name)
        assert list(left) == list(right) and all(torch.equal(left[k], right[k]) for k in left)
    assert one.manifest["settings_hash"] == split.manifest["settings_hash"]
    assert one.manifest["counts"] == split.manifest["counts"]


class PreserveOnly(Lora):
    """Reads C_p only (as FORA does)."""

    name = "preserve_only"
    needs = frozenset({PRESERVE_STATS})


def test_only_the_statistics_a_method_reads_are_stored_and_missing_ones_added(write_recipe, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(write_recipe(calibration=FAST))
    cal = run_calibration(recipe, model, tokenizer, PreserveOnly)
    assert cal.stats() == ["preserve"] and not (cal.dir / "task_stats.safetensors").exists()
    q = "model.layers.0.self_attn.q_proj"
    stored = load_file(cal.dir / "preserve_stats.safetensors")[cal.input_key(q)]
    assert stored.shape == (32 * 33 // 2,)  # the upper triangle only
    upper = cal.upper_triangle("preserve", cal.input_key(q), torch.float64)
    assert upper.dtype == torch.float64 and torch.equal(upper, torch.triu(cal.preserve_cov(q)).double())
    with pytest.raises(PPFTError, match="no task statistics"):
        cal.task_cov(q)
    assert cal.token_counts().keys() == {"preserve"}
    # a method that also reads C_t reuses the folder and adds C_t in place, equal to a fresh run's
    added = ensure_calibration(recipe, model, tokenizer, ExtraLora)
    assert added.reused and added.stats() == ["preserve", "task"]
    assert torch.equal(added.preserve_cov(q), cal.preserve_cov(q))
    fresh = run_calibration(load_recipe(write_recipe("fresh", calibration=FAST)), model, tokenizer, ExtraLora)
    torch.testing.assert_close(added.task_cov(q), fresh.task_cov(q), rtol=0, atol=0)
    assert added.token_counts() == fresh.token_counts()
    assert run_calibration(recipe, model, tokenizer, Lora).stats() == []  # plain LoRA reads none


def test_fingerprint_mismatch_is_refused(write_recipe, model_and_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(write_recipe(calibration=FAST))
    run_calibration(recipe, model, tokenizer, Lora)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(RecipeError, match="another model.*ppft calibrate"):
        load_calibration(recipe, other)
    assert not ensure_calibration(recipe, other.eval(), tokenizer, Lora).reused  # recomputed for the new model
    load_calibration(recipe, other)
    with pytest.raises(RecipeError, match="another model"):
        load_calibration(recipe, model)


def test_missing_extra_is_added_on_reuse(write_recipe, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(write_recipe(calibration=FAST))
    run_calibration(recipe, model, tokenizer, Lora)
    cal = ensure_calibration(recipe, model, tokenizer, ExtraLora)
    assert cal.reused and cal.extra("extra_lora")["n_texts"].item() == 8


def test_failure_leaves_nothing_half_written(write_recipe, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(write_recipe(calibration=FAST))
    with pytest.raises(RuntimeError, match="boom"):
        run_calibration(recipe, model, tokenizer, FailingLora)
    assert not recipe.calibration_dir().exists()
    good = run_calibration(recipe, model, tokenizer, Lora)
    before = (good.dir / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        run_calibration(recipe, model, tokenizer, FailingLora)
    assert (good.dir / "manifest.json").read_text() == before  # the old output is intact
    assert [p.name for p in good.dir.parent.iterdir() if p.name.startswith(".")] == []


def test_compute_then_write_runs_in_eval_mode_and_restores_it(tmp_path):
    """compute and write see eval mode; write's error is raised (after the mode is restored); write only
    on rank 0 (a one-process Dist here), its folder re-read afterwards."""
    from preserve_core.calibration.pipeline import _compute_then_write

    model = torch.nn.Linear(2, 2).train()
    seen = []

    def write(computed):
        seen.append(("write", computed, model.training))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _compute_then_write(model, Dist(), tmp_path, lambda: seen.append(("compute", model.training)) or 7, write)
    assert seen == [("compute", False), ("write", 7, False)] and model.training
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "ppft-calibration", "version": 2}))
    cal = _compute_then_write(model.eval(), Dist(), tmp_path, lambda: None, lambda _: None)
    assert cal.manifest == {"format": "ppft-calibration", "version": 2} and not model.training


def test_refuses_to_replace_a_foreign_folder(write_recipe, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    recipe = load_recipe(write_recipe(calibration={**FAST, "dir": str(foreign)}))
    with pytest.raises(RecipeError, match="not a ppft calibration folder"):
        run_calibration(recipe, model, tokenizer, Lora)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_dataset_source_and_all_task_positions(write_recipe, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    texts = ["abc def", "hello world", "", "x1 y2 z3"]
    data = tmp_path / "preserve.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = {**FAST, "preserve_source": "dataset", "preserve_data": str(data), "num_samples": 3}
    both = ["preserve", "task"]
    loss = run_calibration(load_recipe(write_recipe("a", calibration=cfg)), model, tokenizer, Lora, stats=both)
    assert loss.preserve_texts == ["abc def", "hello world", "x1 y2 z3"]  # all of them, in file order
    assert loss.token_counts()["preserve"] == (1 + 7) + (1 + 11) + (1 + 8)  # [bos] + characters, no eos
    everything = run_calibration(
        load_recipe(write_recipe("b", calibration={**cfg, "task_positions": "all"})), model, tokenizer, Lora, stats=both
    )
    assert everything.token_counts()["task"] > loss.token_counts()["task"]


def test_balanced_task_positions_average_the_loss_and_all_position_statistics(write_recipe, model_and_tokenizer):
    """C_t of ``balanced`` = (C_t over the loss positions + C_t over all positions) / 2, each of those two checked
    against a float64 reference in test_stats_equal_float64_reference; its token counts are the loss positions'."""
    model, tokenizer = model_and_tokenizer
    both = ["preserve", "task"]
    by = {p: run_calibration(load_recipe(write_recipe(p, calibration={**FAST, "task_positions": p})), model, tokenizer,
                             Lora, stats=both) for p in ("loss", "all", "balanced")}  # fmt: skip
    assert by["balanced"].token_counts()["task"] == by["loss"].token_counts()["task"] < by["all"].token_counts()["task"]
    for key in by["loss"].keys():
        loss, every = by["loss"].cov_by_key("task", key).double(), by["all"].cov_by_key("task", key).double()
        assert (loss - every).norm() > 0.1 * loss.norm()  # the two estimates differ: the mean is neither
        mean = (loss + every) / 2
        scale = float(mean.abs().max())
        torch.testing.assert_close(by["balanced"].cov_by_key("task", key).double(), mean, atol=1e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(by["balanced"].cov_by_key("preserve", key), by["loss"].cov_by_key("preserve", key))


def test_cli_calibrate_writes_then_reuses(write_recipe):
    import typer

    from cli.calibrate import calibrate

    app = typer.Typer()
    app.command("calibrate")(calibrate)
    app.command("noop")(lambda: None)
    path = write_recipe(calibration=FAST)
    runner = CliRunner()
    first = runner.invoke(app, ["calibrate", str(path), "--set", "calibration.seed=5", "--summary"])
    assert first.exit_code == 0, first.output
    assert "rank C_p" in first.output and "written" in first.output
    second = runner.invoke(app, ["calibrate", str(path), "--set", "calibration.seed=5"])
    assert second.exit_code == 0 and "reused" in second.output
    bad = runner.invoke(app, ["calibrate", str(path), "--set", "calibration.start=prompts"])
    assert bad.exit_code == 2, bad.output


# ---------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------
SCRIPT = """
import sys, torch
from accelerate import Accelerator
from preserve_core.calibration import run_calibration
from preserve_core.methods.base import PRESERVE_STATS, TASK_STATS
from preserve_core.methods.lora import Lora
from preserve_core.models import load_model, load_tokenizer
from preserve_core.recipe import load_recipe

recipe = load_recipe(sys.argv[1], [f"calibration.dir={sys.argv[2]}", *sys.argv[3:]])
accelerator = Accelerator(cpu=True)
model = load_model(recipe.model, accelerator.device).eval()
run_calibration(recipe, model, load_tokenizer(recipe.model), Lora, accelerator, stats=["preserve", "task"])
accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.mark.slow
def test_two_processes_match_one(write_recipe, tmp_path):
    recipe = write_recipe(calibration={**FAST, "num_samples": 10, "batch_size": 3, "stats_batch_size": 5})
    script = tmp_path / "calibrate_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port, so parallel runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(recipe), str(one)], env=env, check=True, timeout=300)
    # accelerate 1.x: --cpu starts one process; --multi_gpu on a CPU-only machine runs torchrun with gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    # the two processes also split the inputs into passes (5000 bytes: one input per pass): each pass is reduced alone
    proc = subprocess.run([*launch, str(script), str(recipe), str(two), "calibration.stats_memory_gb=5e-6"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "8 passes over the data per statistic" in proc.stderr.replace("\n", "")
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert b["num_processes"] == 2 and a["num_processes"] == 1
    assert a["counts"] == b["counts"]
    assert (one / "preserve.jsonl").read_text() == (two / "preserve.jsonl").read_text()
    for name in ("preserve_stats.safetensors", "task_stats.safetensors"):
        left, right = load_file(one / name), load_file(two / name)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(left[key], right[key], rtol=1e-5, atol=1e-6)


def test_method_registry_untouched():
    assert "extra_lora" not in METHODS


def test_thin_inputs_by_hand():
    """4 tokens per dimension is the bar: 127 tokens for width 32 is thin, 128 is not."""
    from preserve_core.calibration.pipeline import thin_inputs

    counts = {"a": 127, "b": 128, "c": 10}
    dims = {"a": 32, "b": 32, "c": 2}
    assert thin_inputs(counts, dims) == {"a": (127, 32)}
    assert thin_inputs(counts, dims, factor=6) == {"a": (127, 32), "b": (128, 32), "c": (10, 2)}


def test_thin_calibration_warns_once_with_the_worst_input(write_recipe, model_and_tokenizer, capsys):
    """8 samples of <= 10 tokens (< 90 tokens) cannot measure a width-32 input (needs 128), nor the
    width-64 MLP input: one warning, naming the worst (the widest) input; 64 samples of 40 tokens do."""
    model, tokenizer = model_and_tokenizer
    cal = run_calibration(load_recipe(write_recipe("thin", calibration=FAST)), model, tokenizer, PreserveOnly)
    err = capsys.readouterr().err
    assert err.count("tokens per dimension") == 1, err
    tokens = {k: n["preserve"] for k, n in cal.manifest["counts"]["per_key"].items()}
    worst = min(tokens, key=lambda k: tokens[k] / cal.manifest["keys"][k]["dim"])
    assert cal.manifest["keys"][worst]["dim"] == 64 and worst in err.replace("\n", "")
    deep = {**FAST, "num_samples": 64, "max_new_tokens": 40, "min_new_tokens": 30}
    run_calibration(load_recipe(write_recipe("deep", calibration=deep)), model, tokenizer, PreserveOnly)
    assert "tokens per dimension" not in capsys.readouterr().err


def test_dataset_rows_are_drawn_across_an_ordered_file(tmp_path):
    """A file written block by block (4 topics x 25 rows) calibrates on every block, not on its head."""
    from preserve_core.calibration.pipeline import dataset_texts

    data = tmp_path / "ordered.jsonl"
    data.write_text("".join(json.dumps({"text": f"{topic} {i}"}) + "\n" for topic in "abcd" for i in range(25)))
    drawn = dataset_texts(str(data), 20, seed=0)
    assert len(drawn) == len(set(drawn)) == 20
    assert {t.split()[0] for t in drawn} == set("abcd")
    order = [("abcd".index(t.split()[0]), int(t.split()[1])) for t in drawn]
    assert order == sorted(order)  # file order kept
    assert dataset_texts(str(data), 20, seed=0) == drawn
    assert dataset_texts(str(data), 20, seed=1) != drawn
    assert dataset_texts(str(data), 100, seed=3) == [f"{topic} {i}" for topic in "abcd" for i in range(25)]


def test_dataset_draw_is_part_of_the_calibration_identity(write_recipe, model_and_tokenizer, tmp_path):
    """Folders made from a file's first rows (before the draw) must not be reused: the settings say how rows were taken."""
    from preserve_core.calibration.identity import calibration_settings

    model, tokenizer = model_and_tokenizer
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    sampled = load_recipe(write_recipe("s", calibration=FAST))
    dataset = load_recipe(write_recipe("d", calibration={**FAST, "preserve_source": "dataset", "preserve_data": str(data)}))
    assert "dataset_rows" not in calibration_settings(sampled, model, tokenizer)["calibration"]
    assert calibration_settings(dataset, model, tokenizer)["calibration"]["dataset_rows"] == "seeded-draw"
