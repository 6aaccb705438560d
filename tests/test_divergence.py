"""Divergence: a non-finite loss, gradient, weight or optimizer value stops the run, and no checkpoint
is ever written from such a state; the error names a checkpoint that really is finite."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from preserve_core.checkpoint import list_checkpoints
from preserve_core.errors import TrainingDiverged
from preserve_core.methods.lora import Lora
from preserve_core.recipe import load_recipe
from preserve_core.training import train


def _all_checkpoint_tensors_finite(path) -> bool:
    tensors = list(load_file(path / "trainable.safetensors").values())
    blob = torch.load(path / "state.pt", weights_only=True)
    for per_param in blob["optimizer"]["state"].values():
        tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_infinite_lr_writes_no_checkpoint(write_recipe):
    """lr = inf: step 1's loss is finite but the update makes the weights NaN; nothing may be saved."""
    recipe = load_recipe(write_recipe(training={"save_every": 1, "max_steps": 4}))
    object.__setattr__(recipe.training, "lr", math.inf)  # bypass validation (which refuses inf): the engine must be safe on its own
    with pytest.raises(TrainingDiverged) as err:
        train(recipe, show_progress=False)
    message = str(err.value)
    assert "step 1" in message and "no checkpoint" in message and "training.lr" in message
    run_dir = recipe.run_dir()
    assert list_checkpoints(run_dir) == [] and not (run_dir / "final").exists()
    assert not list(run_dir.glob(".tmp-*"))


def _poison_weight(model, optimizer):
    param = next(p for n, p in model.named_parameters() if p.requires_grad)
    param.data[0].fill_(float("nan"))


def _poison_optimizer_state(model, optimizer):
    state = next(iter(optimizer.state.values()))
    state["exp_avg_sq"].fill_(float("inf"))  # weights stay finite this step


@pytest.mark.parametrize("poison", [_poison_weight, _poison_optimizer_state])
def test_poisoned_update_keeps_last_finite_checkpoint(write_recipe, monkeypatch, poison):
    def after_step(self, model, optimizer, step):
        if step == 3:
            poison(model, optimizer)

    monkeypatch.setattr(Lora, "after_step", after_step)
    path = write_recipe(training={"max_steps": 6, "save_every": 1, "keep_last": 5})
    with pytest.raises(TrainingDiverged) as err:
        train(load_recipe(path), show_progress=False)
    assert "step 3" in str(err.value) and "checkpoint-000002" in str(err.value)
    kept = list_checkpoints(load_recipe(path).run_dir())
    assert [p.name for p in kept] == ["checkpoint-000001", "checkpoint-000002"]
    assert all(_all_checkpoint_tensors_finite(p) for p in kept)


def test_non_finite_gradient_with_finite_loss_stops(write_recipe, monkeypatch):
    """sqrt(0 * w) has value 0 but gradient 0 * inf = NaN: only the gradient check can see it."""
    calls = {"n": 0}

    def extra_loss(self, model, batch, outputs):
        calls["n"] += 1
        if calls["n"] < 3:
            return None
        weight = next(p for p in model.parameters() if p.requires_grad)
        return torch.sqrt(weight.sum() * 0.0)

    monkeypatch.setattr(Lora, "extra_loss", extra_loss)
    for clip in (1.0, None):  # the norm comes from clipping, or is computed for the check alone
        path = write_recipe(f"clip{clip}", training={"max_steps": 6, "save_every": 2, "max_grad_norm": clip})
        calls["n"] = 0
        with pytest.raises(TrainingDiverged) as err:
            train(load_recipe(path), show_progress=False)
        assert "gradient norm became nan" in str(err.value) and "step 3" in str(err.value)
        assert [p.name for p in list_checkpoints(load_recipe(path).run_dir())] == ["checkpoint-000002"]


@pytest.mark.parametrize(
    "tensors, finite",
    [
        ([torch.tensor([3e38, 3e38])], True),  # the float32 sum overflows; every element is finite
        ([torch.ones(3), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)], False),
        ([torch.tensor([float("inf"), -float("inf")])], False),  # sums to NaN
        ([torch.zeros(2, 2), torch.tensor([-float("inf")])], False),
        ([torch.tensor([2, 3]), torch.empty(0)], True),  # integer step counters and empty tensors are skipped
    ],
)
def test_all_finite_known_answers(tensors, finite):
    from preserve_core.guards import all_finite

    assert all_finite(tensors) is finite


def test_loss_watch_fires_once_when_the_moving_average_doubles():
    """Ten steps at 2.0 (the average starts, and is best, at 2.0), then 5.0: ema_k = 5 - 3 * 0.9^k after
    k steps past the window, first above 2 x 2.0 at k = 11 (3 * 0.9^10 = 1.046 > 1, 3 * 0.9^11 = 0.941
    < 1): step 21, ema 4.0586 (and 4.0586 - 2 > 1 nat)."""
    from preserve_core.guards import LossWatch

    watch = LossWatch(window=10, factor=2.0)
    fired = [(step, watch.update(2.0 if step <= 10 else 5.0)) for step in range(1, 40)]
    hits = [(step, value) for step, value in fired if value is not None]
    assert len(hits) == 1 and hits[0][0] == 21
    assert hits[0][1] == pytest.approx((2.0, 5 - 3 * 0.9**11), rel=1e-12)


def test_loss_watch_measures_from_the_best_point_and_needs_a_nat():
    """A collapse after learning (6 -> 1 -> 4.5, never above the start) fires; a converged loss that
    triples (0.02 -> 0.06) or a noisy flat one does not."""
    from preserve_core.guards import LossWatch

    def fires(losses):
        watch = LossWatch()
        return [step for step, x in enumerate(losses, 1) if watch.update(x) is not None]

    collapse = [6.0] * 10 + [1.0] * 40 + [4.5] * 40
    assert len(fires(collapse)) == 1 and 50 < fires(collapse)[0] < 70
    assert fires([3.0 * 0.97**k for k in range(200)] + [0.06] * 100) == []  # ends at ~0.01, then 0.06
    assert fires([1.0 + (0.9 if k % 2 else -0.9) for k in range(300)]) == []


def test_a_collapsing_loss_is_reported_and_the_run_goes_on(write_recipe, monkeypatch, capfd):
    """The loop's wiring: a loss that triples after step 10 (finite numbers throughout) logs one
    loss_rising event and warns on stderr; training completes."""
    import json

    from preserve_core import training

    original = training.TrainingLoop.one_step

    def one_step(self):
        loss, tokens, seconds, grad_norm = original(self)
        return (1.0 if self.state.step <= 10 else 3.0), tokens, seconds, grad_norm

    monkeypatch.setattr(training.TrainingLoop, "one_step", one_step)
    result = train(load_recipe(write_recipe(training={"max_steps": 30})), show_progress=False)
    assert result.steps == 30 and result.final_dir is not None
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rising = [e for e in events if e.get("event") == "loss_rising"]
    assert len(rising) == 1 and rising[0]["step"] == 21  # ema 3 - 2 * 0.9^k tops 2 at step 17; the watch waits past 20
    assert rising[0]["loss_best"] == 1.0
    assert "the training loss rose from 1 (its lowest moving average)" in capfd.readouterr().err


def test_loss_watch_state_survives_json_and_continues_where_it_stopped():
    """The first test's losses, stopped after step 15 and restored from JSON: the watch still fires at step
    21 with ema 5 - 3 * 0.9^11. A fresh watch at step 16 would start its average at 5.0 and never fire."""
    import json

    from preserve_core.guards import LossWatch

    watch = LossWatch(window=10, factor=2.0)
    for step in range(1, 16):
        assert watch.update(2.0 if step <= 10 else 5.0) is None
    restored = LossWatch.from_state(json.loads(json.dumps(watch.state())))
    hits = [(step, restored.update(5.0)) for step in range(16, 40)]
    hits = [(step, value) for step, value in hits if value is not None]
    assert len(hits) == 1 and hits[0][0] == 21
    assert hits[0][1] == pytest.approx((2.0, 5 - 3 * 0.9**11), rel=1e-12)
    assert LossWatch.from_state(None).state() == LossWatch().state() == {
        "first": [], "ema": None, "best": None, "steps": 0, "fired": False
    }


def test_a_resumed_run_reports_the_collapse_at_the_step_a_straight_run_does(write_recipe, monkeypatch):
    """The loss triples after step 10; the run stops after its checkpoint at step 15 and resumes. The
    watch's state travels in the checkpoint, so the one loss_rising event is at step 21 (a watch started
    afresh at 16 would average 3.0 from there and stay quiet)."""
    import json

    from preserve_core import training
    from tests.conftest import rewind_to_previous_checkpoint, run_recipe

    original = training.TrainingLoop.one_step

    def one_step(self):
        loss, tokens, seconds, grad_norm = original(self)
        return (1.0 if self.state.step <= 10 else 3.0), tokens, seconds, grad_norm

    monkeypatch.setattr(training.TrainingLoop, "one_step", one_step)
    path = write_recipe(training={"max_steps": 30, "save_every": 15})
    run_dir = run_recipe(path).run_dir
    assert rewind_to_previous_checkpoint(run_dir).name == "checkpoint-000015"
    saved = json.loads((run_dir / "checkpoint-000015" / "trainer_state.json").read_text())["loss_watch"]
    assert saved["steps"] == 15 and saved["fired"] is False and saved["best"] == 1.0
    run_recipe(path, resume=True)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "loss_rising"] == [21]
