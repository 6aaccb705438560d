"""``data.packing``: examples laid end to end with per-example position ids and no cross-example attention."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, rewind_to_previous_checkpoint
from safetensors.torch import load_file

from preserve_core.data import IGNORE, check_packing_support, collate, pack
from preserve_core.errors import RecipeError
from preserve_core.recipe import load_recipe
from preserve_core.training import train


def features(lengths: list[int], seed: int = 0) -> list[dict]:
    """Rows like prompt/completion encodings: the first half of each row is prompt (ignored in the loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(4, 40, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]})
    return rows


def test_pack_layout_by_hand():
    rows = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]}, {"input_ids": [21, 22, 23, 24, 25], "labels": [-100, -100, 23, 24, 25]},
            {"input_ids": [31, 32], "labels": [31, 32]}]  # fmt: skip
    batch = pack(rows, pad_token_id=0, width=6)
    # longest first: [5-token row] then the 3-token row does not fit (5 + 3 > 6), the 2-token row does not fit
    # after it either (5 + 2 > 6) but fits with the 3-token one.
    assert batch["input_ids"].tolist() == [[21, 22, 23, 24, 25], [11, 12, 13, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 23, 24, 25], [-100, 12, 13, -100, 32]]
    padded = pack(rows[:2], pad_token_id=0, width=64)
    assert padded["input_ids"].tolist() == [[21, 22, 23, 24, 25, 11, 12, 13]]
    assert pack(rows, 0, 4)["input_ids"].shape == (3, 5)  # width below the longest: one example per row


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels[:, 1:]`` under ``logits[:, :-1]`` over non-ignored targets, in the logits' dtype."""
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    keep = target != IGNORE
    return -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][keep].mean()


def test_packed_loss_and_gradients_equal_unpacked_in_float64():
    model = build_tiny_llama(48, hidden=32, layers=2).double()
    rows = features([5, 17, 9, 30, 3, 12, 24, 8])
    padded = collate(rows, pad_token_id=0)
    packed = pack(rows, pad_token_id=0, width=32)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    losses, grads, hf_losses = [], [], []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(**batch, use_cache=False)
        loss = causal_nll(out.logits, batch["labels"])  # float64 (transformers' own loss is float32)
        loss.backward()
        losses.append(loss.detach())
        hf_losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    # independently: every example alone, unpadded, its own positions
    nll, count = 0.0, 0
    for f in rows:
        logp = torch.log_softmax(model(input_ids=torch.tensor([f["input_ids"]])).logits[0].detach(), -1)
        for t, label in enumerate(f["labels"][1:]):
            if label != IGNORE:
                nll, count = nll - float(logp[t, label]), count + 1
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    assert abs(float(losses[1]) - nll / count) < 1e-10
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hf_losses[0], hf_losses[1], rtol=1e-6, atol=1e-6)


def test_a_model_that_ignores_position_ids_is_refused():
    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_tiny_llama(48)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=use_cache)  # one causal sequence: attends across

    check_packing_support(build_tiny_llama(48), 48)
    with pytest.raises(RecipeError, match="data.packing"):
        check_packing_support(NoPositions(), 48)


def mixed_length_recipe(write_recipe, tmp_path, name: str, packing: bool, **training):
    from tests.conftest import write_jsonl

    rows = [{"prompt": "rev:" + "ab" * (1 + i % 9) + "=", "completion": "ba" * (1 + i % 9)} for i in range(48)]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    common = {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "save_every": 4, "keep_last": 5, "log_every": 1, **training}
    return write_recipe(name, data={"train": str(data), "max_length": 48, "packing": packing}, training=common)


def test_packed_training_matches_unpacked_and_resumes_exactly(write_recipe, tmp_path):
    packed = train(load_recipe(mixed_length_recipe(write_recipe, tmp_path, "packed", True)), show_progress=False)
    padded = train(load_recipe(mixed_length_recipe(write_recipe, tmp_path, "padded", False)), show_progress=False)
    loss = lambda r: [m["loss"] for m in r.metrics if "loss" in m]  # noqa: E731
    tokens = lambda r: [m["tokens"] for m in r.metrics if "tokens" in m]  # noqa: E731
    assert tokens(packed) == tokens(padded)  # real tokens counted, not padding
    torch.testing.assert_close(torch.tensor(loss(packed)), torch.tensor(loss(padded)), rtol=1e-4, atol=1e-5)

    path = mixed_length_recipe(write_recipe, tmp_path, "resumed", True)
    first = train(load_recipe(path), show_progress=False)
    rewind_to_previous_checkpoint(first.run_dir)  # back to checkpoint-4, mid-epoch (6 batches per epoch)
    resumed = train(load_recipe(path), resume=True, show_progress=False)
    assert loss(resumed) == loss(packed)[4:]
    a = load_file(packed.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
