"""The training engine: learning, exact resume, exports, divergence and interruption handling."""

from __future__ import annotations

import torch
from conftest import assert_same_tensors, at_step, raise_keyboard_interrupt
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preserve_core.checkpoint import list_checkpoints
from preserve_core.errors import TrainingDiverged
from preserve_core.methods.lora import Lora
from preserve_core.recipe import load_recipe
from preserve_core.training import train


def run(path, *overrides, resume=False):
    return train(load_recipe(path, list(overrides)), resume=resume, show_progress=False)


def test_loss_decreases(write_recipe):
    """A random tiny model with frozen random embeddings learns slowly; the drop must still be clear.

    LoRA's 40-step drop is ~0.08-0.11 depending on the thread count's float summation order (measured
    with 1 and 2 threads), so it gets a smaller margin than full fine-tuning (~0.155); an untrained
    adapter drops ~0."""
    cases = (({"name": "full"}, 1e-2, 0.1), ({"name": "lora", "r": 8, "alpha": 32}, 3e-2, 0.05))
    for method, lr, margin in cases:
        result = run(write_recipe(method["name"], method=method, training={"max_steps": 40, "lr": lr, "schedule": "constant"}))
        losses = [m["loss"] for m in result.metrics if "loss" in m]
        assert len(losses) == 40
        print(method["name"], sum(losses[:5]) / 5, sum(losses[-5:]) / 5)
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - margin, (method, losses)


def _final_weights(run_dir, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(run_dir / "final" / "adapter_model.safetensors")
    return load_file(run_dir / "final" / "model.safetensors")


def test_resume_is_exact(write_recipe):
    for method in ({"name": "lora", "r": 4}, {"name": "full"}):
        common = {"max_steps": 10, "save_every": 5, "keep_last": 5, "lr": 1e-2, "warmup_steps": 2, "grad_accum": 2}
        straight = run(write_recipe("straight-" + method["name"], method=method, training=common))
        interrupted = write_recipe("resumed-" + method["name"], method=method, training=common)
        first = run(interrupted)
        import shutil

        shutil.rmtree(first.run_dir / "final")
        shutil.rmtree(list_checkpoints(first.run_dir)[-1])  # back to checkpoint-5
        assert list_checkpoints(first.run_dir)[-1].name == "checkpoint-000005"
        run(interrupted, resume=True)
        a, b = (_final_weights(r.run_dir, method["name"]) for r in (straight, first))
        assert_same_tensors(a, b, atol=1e-6)


def test_lora_adapter_loads_with_stock_peft(write_recipe, tiny_model_dir):
    result = run(write_recipe(training={"max_steps": 8, "lr": 5e-2}))
    ids = torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        before = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, result.final_dir).eval()
        got = loaded(input_ids=ids).logits
    assert not torch.allclose(before, expected, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_merge_writes_full_weights(write_recipe, tiny_model_dir):
    result = run(write_recipe(training={"max_steps": 4, "lr": 5e-2}, output={"merge": True}))
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged").eval()
    ids = torch.tensor([[1, 21, 8, 25, 43]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_full_method_trains_only_targets(write_recipe):
    result = run(write_recipe(method={"name": "full"}, training={"max_steps": 2}))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "_proj")) for n in trainable)
    assert not any("embed" in n or "lm_head" in n for n in trainable)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(write_recipe, monkeypatch):
    calls = {"n": 0}

    def poisoned(self, model, batch, outputs):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 3 else None

    monkeypatch.setattr(Lora, "extra_loss", poisoned)
    path = write_recipe(training={"max_steps": 10, "save_every": 2})
    try:
        run(path)
        raise AssertionError("expected TrainingDiverged")
    except TrainingDiverged as e:
        assert "checkpoint-000002" in str(e)
    run_dir = load_recipe(path).run_dir()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000002"]
    assert not (run_dir / "final").exists()


def test_interrupt_saves_resumable_checkpoint(write_recipe, monkeypatch):
    from preserve_core import training

    original = at_step(monkeypatch, 4, raise_keyboard_interrupt)
    path = write_recipe(training={"max_steps": 6})
    result = run(path)
    assert result.interrupted and result.steps == 3
    assert list_checkpoints(result.run_dir)[-1].name == "checkpoint-000003"
    monkeypatch.setattr(training.TrainingLoop, "one_step", original)
    resumed = run(path, resume=True)
    assert resumed.steps == 6 and (resumed.run_dir / "final" / "adapter_model.safetensors").exists()


def test_manifest_and_resolved_recipe(write_recipe):
    import json

    result = run(write_recipe(training={"max_steps": 2}))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["model_fingerprint"] and manifest["data"]["train_sha256"]
    assert manifest["packages"]["torch"] and manifest["seed"] == 0
    assert (result.run_dir / "recipe.resolved.yaml").exists()
