"""The training engine's pieces, called directly with stand-ins whose every number is known by hand.

``TrainingLoop`` gets a one-parameter model (``loss = w * mean of the scored input ids``), plain SGD
and a constant schedule, so one update, the accumulated loss, the clipped gradient and the logged
metrics are all short sums written out in each test.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from preserve_core import training
from preserve_core.checkpoint import TrainState, list_checkpoints, save_checkpoint
from preserve_core.errors import PPFTError, RecipeError, TrainingDiverged
from preserve_core.training import BatchStream, TrainingLoop, build_scheduler, check_runtime, epoch_batches, make_accelerator


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------
def _perm(n: int, seed: int, epoch: int) -> list[int]:
    """The documented order: ``randperm(n)`` seeded with ``seed * 100003 + epoch`` (checkpoints rely on it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@pytest.mark.parametrize(
    "n, batch, seed, epoch, rank, world",
    [(10, 4, 0, 0, 0, 1), (10, 4, 2, 3, 0, 1), (11, 2, 1, 1, 1, 3), (12, 3, 5, 0, 2, 3), (9, 3, 0, 2, 1, 2)],
)
def test_epoch_batches_are_the_seeded_permutation_strided_by_rank(n, batch, seed, epoch, rank, world):
    mine = _perm(n, seed, epoch)[rank::world]
    full = len(mine) // batch
    expected = [mine[i * batch : (i + 1) * batch] for i in range(full)]  # the last partial batch is dropped
    assert epoch_batches(n, batch, seed, epoch, rank, world) == expected


def test_epoch_batches_by_hand_and_short_shards():
    order = _perm(5, 0, 0)
    assert epoch_batches(5, 4, 0, 0, 1, 2) == [order[1::2]]  # 2 examples < batch 4: one short batch
    assert epoch_batches(5, 2, 0, 0, 1, 2) == [order[1::2]]  # exactly one batch
    assert epoch_batches(3, 4, 0, 0, 0, 1) == [_perm(3, 0, 0)]
    assert epoch_batches(1, 1, 0, 0, 1, 2) == []  # rank 1 of 2 has nothing
    assert epoch_batches(6, 2, 1, 0, 0, 1) == epoch_batches(6, 2, 0, 100_003, 0, 1)  # seed 1 = epoch 100003


class Rows(list):
    """A data set: example ``i`` is ``[v_i] * len_i`` with every token a label."""

    @classmethod
    def of(cls, lengths: list[int], values: list[int] | None = None) -> Rows:
        values = values or [i + 1 for i in range(len(lengths))]
        return cls({"input_ids": [v] * n, "labels": [v] * n} for n, v in zip(lengths, values, strict=True))


def test_batch_stream_walks_epochs_and_resumes_mid_epoch():
    rows = Rows.of([1, 2, 3, 4, 5])
    stream = BatchStream(rows, 2, seed=3, pad_id=0, rank=0, world=1, state=TrainState())
    e0, e1 = epoch_batches(5, 2, 3, 0, 0, 1), epoch_batches(5, 2, 3, 1, 0, 1)
    seen = []
    for _ in range(4):
        batch = stream.next()
        seen.append(sorted(set(batch["input_ids"][batch["attention_mask"].bool()].tolist())))
        assert stream.last_tokens == int(batch["attention_mask"].sum())
    expected = [sorted(rows[i]["input_ids"][0] for i in b) for b in e0 + e1]
    assert seen == expected and (stream.epoch, stream.position) == (1, 2)
    resumed = BatchStream(rows, 2, seed=3, pad_id=0, rank=0, world=1, state=TrainState(epoch=1, position=1))
    batch = resumed.next()
    assert sorted(set(batch["input_ids"][batch["attention_mask"].bool()].tolist())) == expected[3]
    assert (resumed.epoch, resumed.position, resumed.last_tokens) == (1, 2, sum(len(rows[i]["input_ids"]) for i in e1[1]))


def test_batch_stream_pads_with_its_pad_id_or_packs():
    rows = Rows.of([1, 3], values=[5, 6])
    stream = BatchStream(rows, 2, seed=0, pad_id=7, rank=0, world=1, state=TrainState())
    assert (stream.rank, stream.world, stream.seed, stream.batch_size, stream.packing, stream.last_tokens) == (0, 1, 0, 2, False, 0)
    batch = stream.next()
    assert sorted(batch["input_ids"].tolist()) == [[5, 7, 7], [6, 6, 6]] and stream.last_tokens == 4
    packed = BatchStream(Rows.of([1, 2], values=[5, 6]), 2, 0, 7, 0, 1, TrainState(), packing=True).next()
    # packed into rows no longer than the longest example (2): [6 6] and [5 pad]
    assert packed["input_ids"].tolist() == [[6, 6], [5, 7]] and packed["position_ids"].tolist() == [[0, 1], [0, 0]]


def test_batch_stream_with_rank_and_world():
    rows = Rows.of([1] * 6, values=list(range(10, 16)))
    stream = BatchStream(rows, 1, seed=4, pad_id=0, rank=2, world=3, state=TrainState())
    order = _perm(6, 4, 0)
    assert [int(stream.next()["input_ids"]) for _ in range(2)] == [10 + order[2], 10 + order[5]]
    with pytest.raises(RecipeError) as err:
        BatchStream(Rows.of([1]), 1, 0, 0, rank=1, world=2, state=TrainState())
    assert str(err.value) == "data: fewer training examples than processes; add data or use fewer processes"


# ---------------------------------------------------------------------------------------------
# schedule, accelerator, runtime checks
# ---------------------------------------------------------------------------------------------
def _lrs(schedule: str, warmup: int, max_steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SimpleNamespace(schedule=schedule, warmup_steps=warmup, max_steps=max_steps))
    out = []
    for _ in range(max_steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_from_their_formulas():
    """Warmup ``s / w``; then linear ``(T - s) / (T - w)``, cosine ``(1 + cos(pi (s - w) / (T - w))) / 2``, constant 1."""
    assert _lrs("linear", 2, 6) == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25])
    cosine = [0, 0.5] + [(1 + math.cos(math.pi * (s - 2) / 4)) / 2 for s in range(2, 6)]
    assert _lrs("cosine", 2, 6) == pytest.approx(cosine)
    assert _lrs("constant", 3, 6) == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])
    assert _lrs("linear", 0, 4) == pytest.approx([1, 0.75, 0.5, 0.25])


def _recipe(precision: str = "no", grad_accum: int = 1, timeout_s: int | None = None):
    distributed = SimpleNamespace(timeout_s=timeout_s)
    config = SimpleNamespace(mixed_precision=precision, grad_accum=grad_accum, distributed=distributed)
    return SimpleNamespace(training=config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU fallbacks")
def test_accelerator_on_cpu_drops_mixed_precision_and_keeps_accumulation():
    accelerator = make_accelerator(_recipe("bf16", grad_accum=3))
    assert accelerator.mixed_precision == "no" and accelerator.gradient_accumulation_steps == 3
    assert accelerator.device == torch.device("cpu")
    assert make_accelerator(_recipe("no", 1)).gradient_accumulation_steps == 1
    assert make_accelerator(_recipe()).init_handler is None  # torch's own timeout
    assert make_accelerator(_recipe(timeout_s=90)).init_handler.timeout.total_seconds() == 90
    with pytest.raises(PPFTError) as err:
        check_runtime(_recipe("fp16"))
    assert str(err.value) == "training.mixed_precision: fp16 needs a GPU; use 'no' on CPU"
    check_runtime(_recipe("bf16"))
    check_runtime(_recipe("no"))


@pytest.mark.parametrize(
    "cuda, precision, expected",
    [(False, "bf16", (True, "no")), (False, "no", (True, "no")), (True, "bf16", (False, "bf16")), (True, "fp16", (False, "fp16"))],
)
def test_accelerator_options_by_machine(monkeypatch, cuda, precision, expected):
    """The options ``make_accelerator`` asks Accelerate for: CPU mode and no autocast without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(training, "Accelerator", lambda **options: options)
    options = make_accelerator(_recipe(precision, grad_accum=2))
    assert options == {"cpu": expected[0], "mixed_precision": expected[1], "gradient_accumulation_steps": 2,
                       "kwargs_handlers": []}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the loop, with stand-ins
# ---------------------------------------------------------------------------------------------
class Scalar(nn.Module):
    """``loss = w * (mean of input ids at scored label positions)``; refuses a KV cache."""

    def __init__(self, w: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.calls, self.use_cache = 0, []

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=None, position_ids=None):
        self.use_cache.append(use_cache)
        self.calls += 1
        values = input_ids[:, 1:][labels[:, 1:] != -100].double()
        mean = values.mean().float() if values.numel() else torch.zeros(())
        return SimpleNamespace(loss=self.w[0] * mean)


class Log:
    def __init__(self):
        self.lines = []

    def log(self, step, **values):
        self.lines.append({"step": step, **values})


def _cfg(**overrides):
    cfg = dict(batch_size=1, seed=0, grad_accum=1, max_steps=4, log_every=1, eval_every=0, save_every=0, keep_last=2,
               max_grad_norm=None, lr=0.5)  # fmt: skip
    return SimpleNamespace(**{**cfg, **overrides})


def _loop(tmp_path: Path, rows=None, model=None, accelerator=None, state=None, tokenizer=None, eval_set=None, **cfg):
    cfg = _cfg(**cfg)
    recipe = SimpleNamespace(training=cfg, data=SimpleNamespace(packing=False), eval=SimpleNamespace(every_n_steps=3, preserve=[]),
                             run_dir=lambda: tmp_path)  # fmt: skip
    model = model or Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    accelerator = accelerator or Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum)
    tokenizer = tokenizer or SimpleNamespace(pad_token_id=0, eos_token_id=2)
    method = SimpleNamespace(extra_loss=lambda m, b, o: None, after_step=lambda m, o, s: None)
    rows = rows if rows is not None else Rows.of([3, 4, 5, 6])
    return TrainingLoop(recipe, accelerator, model, optimizer, scheduler, method, tokenizer, rows, eval_set, Log(),
                        state or TrainState())  # fmt: skip


def _scored_mean(example: dict) -> float:
    return float(example["input_ids"][0])  # every token holds the value


def test_packing_is_checked_on_the_unwrapped_model(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(training, "check_packing_support", lambda model, vocab: checked.append((model, vocab)))
    recipe = SimpleNamespace(training=_cfg(batch_size=2), data=SimpleNamespace(packing=True), run_dir=lambda: tmp_path)
    model = Scalar()
    tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 2, "__len__": lambda self: 17})()
    loop = TrainingLoop(recipe, Accelerator(cpu=True), model, None, None, None, tokenizer, Rows.of([1, 2]), None, Log(), TrainState())
    assert checked == [(model, 17)] and loop.stream.packing is True
    assert "position_ids" in loop.stream.next()


def test_loop_setup(tmp_path):
    loop = _loop(tmp_path, tokenizer=SimpleNamespace(pad_token_id=None, eos_token_id=2), state=TrainState(step=5, epoch=1, position=2))
    stream = loop.stream
    assert loop.pad_id == 2 and stream.pad_id == 2 and loop.saved_step == 5 and loop.retention is None
    assert (stream.batch_size, stream.seed, stream.rank, stream.world, stream.epoch, stream.position, stream.packing) == (1, 0, 0, 1, 1, 2, False)
    assert loop.metrics == [] and loop.sharded is False and loop.regularizers.extra_loss(None, None, None) is None
    fresh = _loop(tmp_path, tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2), seed=7, batch_size=2)
    assert fresh.pad_id == 0 and fresh.saved_step is None and (fresh.stream.seed, fresh.stream.batch_size) == (7, 2)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_one_step_by_hand(tmp_path, monkeypatch, grad_accum):
    """SGD, lr 0.5: ``w <- w - 0.5 * mean_m(s_m)``; loss ``mean_m(w s_m)``; tokens ``sum_m len_m``."""
    rows = Rows.of([3, 4, 5, 6], values=[2, 4, 6, 8])
    loop = _loop(tmp_path, rows, grad_accum=grad_accum)
    loop.model.eval()
    order = [b[0] for b in epoch_batches(4, 1, 0, 0, 0, 1)][:grad_accum]
    s = [_scored_mean(rows[i]) for i in order]
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    loss, tokens, seconds, grad_norm = loop.one_step()
    monkeypatch.undo()
    assert loss == pytest.approx(sum(s) / grad_accum) and grad_norm == pytest.approx(sum(s) / grad_accum)
    assert tokens == sum(len(rows[i]["input_ids"]) for i in order) and seconds == 2.5
    assert loop.model.use_cache == [False] * grad_accum  # packed rows need position ids, not a cache
    assert float(loop.model.w.detach()) == pytest.approx(1 - 0.5 * sum(s) / grad_accum)
    assert loop.model.training and loop.model.w.grad is None  # zeroed (set to None) after the update
    st = loop.state
    assert (st.step, st.epoch, st.position, st.tokens) == (1, 0, grad_accum, tokens)
    loss2, tokens2, _, _ = loop.one_step()
    assert loop.state.tokens == tokens + tokens2 and loop.state.step == 2


def test_one_step_clips_and_calls_the_method_after_the_update(tmp_path):
    rows = Rows.of([2, 2], values=[8, 8])
    loop = _loop(tmp_path, rows, max_grad_norm=1.0)
    seen = []
    loop.method.after_step = lambda model, optimizer, step: seen.append((model, optimizer, step, float(model.w)))
    _, _, _, grad_norm = loop.one_step()
    assert grad_norm == pytest.approx(8.0)
    assert float(loop.model.w) == pytest.approx(1 - 0.5 * 8 / (8 + 1e-6), rel=1e-6)  # torch: g * c / (|g| + 1e-6)
    assert seen == [(loop.model, loop.optimizer, 1, pytest.approx(float(loop.model.w)))]


def test_one_step_adds_the_extra_loss(tmp_path):
    rows = Rows.of([2, 2], values=[3, 3])
    loop = _loop(tmp_path, rows)
    loop.method.extra_loss = lambda model, batch, outputs: model.w[0] * 10
    loss, *_ = loop.one_step()
    assert loss == pytest.approx(13.0) and float(loop.model.w) == pytest.approx(1 - 0.5 * 13)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    loop = _loop(tmp_path, Rows.of([2, 2]), model=Scalar(float("nan")))
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 1: the loss became nan;"):
        loop.one_step()
    assert loop.state.step == 0


def test_an_update_that_poisons_the_weights_stops_at_its_step(tmp_path):
    loop = _loop(tmp_path, Rows.of([2, 2]))
    loop.method.after_step = lambda model, optimizer, step: model.w.data.fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 1: the update made trainable weights or optimizer state non-finite;"):
        loop.one_step()


def test_extra_loss_sums_method_then_regularizers(tmp_path):
    loop = _loop(tmp_path)
    batch, outputs = object(), object()
    calls = []

    def term(value):
        def extra(model, b, o):
            calls.append((model, b, o))
            return value

        return extra

    loop.method.extra_loss = term(torch.tensor(2.0))
    loop.regularizers = SimpleNamespace(extra_loss=term(torch.tensor(5.0)))
    assert float(loop.extra_loss(batch, outputs)) == 7.0
    assert calls == [(loop.model, batch, outputs)] * 2
    loop.method.extra_loss = term(None)
    assert float(loop.extra_loss(batch, outputs)) == 5.0
    loop.regularizers = SimpleNamespace(extra_loss=term(None))
    assert loop.extra_loss(batch, outputs) is None
    loop.method.extra_loss = term(torch.tensor(3.0))
    assert float(loop.extra_loss(batch, outputs)) == 3.0


class FakeAccelerator:
    """Two ranks; the other holds 3.0, so sum = x + 3 and mean = (x + 3) / 2. The step boundary's stop
    flags ([Ctrl-C, SIGTERM], shape 2) sum with the other rank's ``other_stop``."""

    num_processes, process_index, is_main_process, device = 2, 0, True, torch.device("cpu")
    scaler = None
    other_stop = (0.0, 0.0)

    def reduce(self, t, reduction):
        assert t.dtype == torch.float32
        if t.shape == (2,):
            assert reduction == "sum"
            return t + torch.tensor(self.other_stop)
        assert t.shape == (1,)
        return {"sum": t + 3, "mean": (t + 3) / 2}[reduction]

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def wait_for_everyone(self):
        pass


def test_means_and_sums_over_ranks(tmp_path):
    loop = _loop(tmp_path)
    assert loop._mean_over_ranks(1.5) == 1.5 and loop._sum_over_ranks(5) == 5  # one process: unchanged
    loop.accelerator = FakeAccelerator()
    assert loop._mean_over_ranks(1.0) == 2.0 and loop._sum_over_ranks(5) == 8.0


def _with_grads(loop, *grads):
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads] + [nn.Parameter(torch.zeros(1))]  # the last: no grad
    for p, g in zip(params, grads, strict=False):
        p.grad = torch.tensor(g)
    loop._trainable = lambda: params
    return params


def test_gradient_norm_clipped_or_measured(tmp_path):
    loop = _loop(tmp_path, max_grad_norm=1.0)
    loop.accelerator = FakeAccelerator()
    params = _with_grads(loop, [3.0], [4.0])
    assert loop._clip_gradients() == pytest.approx(5.0)
    assert params[0].grad.item() == pytest.approx(0.6, rel=1e-5) and params[1].grad.item() == pytest.approx(0.8, rel=1e-5)
    loop.cfg.max_grad_norm = None
    params = _with_grads(loop, [3.0], [4.0])
    assert loop._clip_gradients() == pytest.approx(5.0) and params[0].grad.item() == 3.0  # measured, not clipped
    _with_grads(loop)
    assert loop._clip_gradients() == 0.0  # no gradients at all
    loop.accelerator.scaler = object()  # fp16 loss scaling without clipping: no norm
    assert loop._clip_gradients() is None


def test_sharded_clipping_uses_the_sharded_rule(tmp_path):
    loop = _loop(tmp_path, max_grad_norm=1.0)
    loop.sharded = True
    params = _with_grads(loop, [6.0, 8.0])
    assert loop._clip_gradients() == pytest.approx(10.0)
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert loop._state_finite() is True


def test_non_finite_gradient_diverges_unless_fp16_scaling(tmp_path):
    loop = _loop(tmp_path, max_grad_norm=None)
    loop.accelerator = FakeAccelerator()
    _with_grads(loop, [float("inf")])
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 1: the gradient norm became inf;"):
        loop._clip_gradients()
    loop.cfg.max_grad_norm = 1.0
    loop.accelerator.scaler = object()
    assert loop._clip_gradients() == math.inf


def test_state_finite_checks_weights_and_moments(tmp_path):
    model = Scalar()
    loop = _loop(tmp_path, model=model)
    loop.optimizer = torch.optim.Adam(model.parameters())
    model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2]])).loss.backward()
    loop.optimizer.step()
    assert loop._state_finite() is True
    loop.optimizer.state[model.w]["exp_avg"].fill_(float("nan"))
    assert loop._state_finite() is False
    loop.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.w.data.fill_(float("-inf"))
    assert loop._state_finite() is False


def _intact_checkpoint(run_dir: Path, step: int) -> Path:
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = SimpleNamespace(trainable_state=lambda m: {"w": m.weight}, state_dict=lambda: {})
    return save_checkpoint(run_dir, TrainState(step=step), method, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 2)


def test_divergence_message_names_the_good_checkpoint_and_the_fix(tmp_path):
    loop = _loop(tmp_path, lr=0.5, state=TrainState(step=6))
    with pytest.raises(TrainingDiverged) as err:
        loop._diverged("the loss became nan")
    assert str(err.value) == (
        "training diverged at step 7: the loss became nan; stopped without saving it (no checkpoint was saved before it). "
        "Lower the learning rate (training.lr is 0.5; try --set training.lr=0.05), "
        "enable clipping (training.max_grad_norm), or check the data."
    )
    good = _intact_checkpoint(tmp_path, 4)
    loop.cfg.lr = math.inf
    with pytest.raises(TrainingDiverged) as err:
        loop._diverged("x", step=6)
    assert str(err.value) == (
        f"training diverged at step 6: x; stopped without saving it (the last good checkpoint is {good}). "
        "Lower the learning rate (training.lr is inf; try --resume --allow-changes --set training.lr=1e-4), "
        "enable clipping (training.max_grad_norm), or check the data."
    )


# ---------------------------------------------------------------------------------------------
# after a step: progress, metrics, eval, retention, checkpoints
# ---------------------------------------------------------------------------------------------
class Progress:
    def __init__(self):
        self.updates = []

    def update(self, step, loss, lr, tokens_per_s):
        self.updates.append((step, loss, lr, tokens_per_s))


class Scheduler:
    def get_last_lr(self):
        return [0.25, 0.5]  # group 0 is the one reported


def test_after_step_logs_evaluates_measures_and_saves_on_their_steps(tmp_path):
    loop = _loop(tmp_path, max_steps=7, log_every=3, eval_every=2, save_every=4)
    loop.eval_set = ["row"]
    loop.scheduler = Scheduler()
    loop.eval_loss = lambda: 1.5
    loop.retention = SimpleNamespace(measure=lambda model: {"retention": 0.9 if model is loop.model else None})
    saved = []
    loop.checkpoint = lambda: saved.append(loop.state.step)
    progress = Progress()
    for step in range(1, 8):
        loop.state.step, loop.state.tokens = step, 100 * step
        loop.after_step(2.0 + step, tokens=10, seconds=0.5, grad_norm=None if step == 6 else 0.1, progress=progress)
    assert progress.updates == [(s, 2.0 + s, 0.25, 20.0) for s in range(1, 8)]
    train = {"lr": 0.25, "tokens_per_s": 20.0, "step_seconds": 0.5}
    assert loop.metrics == [
        {"step": 2, "eval_loss": 1.5},
        {"step": 3, "loss": 5.0, **train, "grad_norm": 0.1, "tokens": 300},
        {"step": 3, "retention": 0.9},
        {"step": 4, "eval_loss": 1.5},
        {"step": 6, "loss": 8.0, **train, "tokens": 600},  # a None grad norm is left out
        {"step": 6, "eval_loss": 1.5},
        {"step": 6, "retention": 0.9},
        {"step": 7, "loss": 9.0, **train, "grad_norm": 0.1, "tokens": 700},  # the last step is always logged
    ]
    assert loop.log.lines == loop.metrics and saved == [4]


def test_after_step_without_eval_set_retention_or_saving(tmp_path):
    loop = _loop(tmp_path, max_steps=5, log_every=10, eval_every=1, save_every=0)
    loop.scheduler = Scheduler()
    loop.eval_loss = lambda: pytest.fail("no eval set")
    loop.checkpoint = lambda: pytest.fail("save_every 0")
    progress = Progress()
    for step in (1, 5):
        loop.state.step = step
        loop.after_step(1.0, tokens=3, seconds=0.0, grad_norm=0.2, progress=progress)
    assert progress.updates[0] == (1, 1.0, 0.25, pytest.approx(3e9))  # seconds clamped to 1e-9
    assert [m["step"] for m in loop.metrics] == [5]


def test_eval_loss_is_the_token_weighted_mean(tmp_path):
    """Rows of 3, 2, 4 and 1 tokens (2, 1, 3, 0 scored) valued 1, 2, 3, 4 in batches of 2:
    ``(2*1 + 1*2 + 3*3) / 6 = 13 / 6`` (the one-token row scores nothing)."""
    eval_set = Rows.of([3, 2, 4, 1])
    loop = _loop(tmp_path, eval_set=eval_set, batch_size=2)
    loop.model.train()
    assert loop.eval_loss() == pytest.approx(13 / 6) and not loop.model.training
    assert loop.model.calls == 2
    loop.eval_set = Rows.of([1])
    assert loop.eval_loss() == 0.0  # nothing scored: 0 / max(0, 1)
    loop.accelerator = FakeAccelerator()
    loop.eval_set = Rows.of([2, 2], values=[1, 1])
    assert loop.eval_loss() == pytest.approx((1.0 + 3) / 2)


def test_checkpoint_saves_once_per_step_on_the_main_process(tmp_path):
    loop = _loop(tmp_path, keep_last=1, state=TrainState(step=2, epoch=0, position=2))
    loop.method.trainable_state = lambda model: {"w": model.w}
    loop.method.state_dict = lambda: {}
    assert loop.checkpoint() == tmp_path / "checkpoint-000002" and list_checkpoints(tmp_path) == []  # resumed: exists
    loop.state.step = 3
    path = loop.checkpoint()
    assert path == tmp_path / "checkpoint-000003" and loop.saved_step == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003"]
    stamp = (path / "state.pt").stat().st_mtime_ns
    assert loop.checkpoint() == path and (path / "state.pt").stat().st_mtime_ns == stamp
    loop.state.step = 4
    loop.model.w.data.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 4: trainable weights or optimizer state are non-finite;"):
        loop.checkpoint()
    loop.model.w.data.fill_(1.0)
    loop.accelerator = FakeAccelerator()
    loop.accelerator.is_main_process = False
    assert loop.checkpoint() is None and loop.saved_step == 4 and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003"]


# ---------------------------------------------------------------------------------------------
# the run loop
# ---------------------------------------------------------------------------------------------
def _scripted(loop, interrupt_at: int | None = None, interrupt=KeyboardInterrupt):
    """``one_step`` returns loss ``10 + step``; ``after_step`` and ``checkpoint`` are recorded."""
    calls = {"after": [], "saved": []}

    def one_step():
        if loop.state.step + 1 == interrupt_at:
            raise interrupt
        loop.state.step += 1
        return 10.0 + loop.state.step, 5, 0.1, 0.2

    loop.one_step = one_step
    loop.after_step = lambda loss, tokens, seconds, grad_norm, progress: calls["after"].append((loss, tokens, seconds, grad_norm))
    loop.checkpoint = lambda interrupted=False: calls["saved"].append((loop.state.step, interrupted)) or tmp_path_of(loop)
    return calls


def tmp_path_of(loop) -> Path:
    return loop.recipe.run_dir() / f"checkpoint-{loop.state.step:06d}"


@pytest.mark.parametrize("save_every, final_save", [(0, True), (3, False), (4, True)])
def test_run_steps_to_the_end_and_saves_the_last_step_once(tmp_path, monkeypatch, save_every, final_save):
    monkeypatch.setattr("preserve_core.retention.RetentionTracker.maybe", lambda *args: ("tracker", *args))
    loop = _loop(tmp_path, max_steps=6, save_every=save_every)
    calls = _scripted(loop)
    result = loop.run(show_progress=False)
    assert calls["after"] == [(10.0 + s, 5, 0.1, 0.2) for s in range(1, 7)]
    assert loop.retention == ("tracker", loop.recipe, loop.tokenizer, loop.accelerator, loop.model)
    assert calls["saved"] == ([(6, False)] if final_save else [])
    assert (result.run_dir, result.final_dir, result.steps, result.final_loss) == (tmp_path, None, 6, 16.0)
    assert not result.interrupted and not result.terminated and result.metrics is loop.metrics


def test_run_at_max_steps_does_nothing(tmp_path):
    loop = _loop(tmp_path, max_steps=3, state=TrainState(step=3))
    calls = _scripted(loop)
    result = loop.run(show_progress=False)
    assert calls["after"] == [] and result.steps == 3 and math.isnan(result.final_loss)


@pytest.mark.parametrize("terminated", [False, True])
def test_an_interrupt_saves_and_says_so(tmp_path, capsys, terminated):
    from preserve_core.guards import Terminated

    loop = _loop(tmp_path, max_steps=6)
    calls = _scripted(loop, interrupt_at=3, interrupt=Terminated() if terminated else KeyboardInterrupt())
    result = loop.run(show_progress=False)
    assert calls["saved"] == [(2, True)]
    assert result.interrupted and result.terminated == terminated and (result.steps, result.final_loss) == (2, 12.0)
    assert result.final_dir is None and result.run_dir == tmp_path and result.metrics is loop.metrics
    what = "Terminated (SIGTERM)" if terminated else "Interrupted"
    assert capsys.readouterr().err == f"{what}: saved {tmp_path / 'checkpoint-000002'}. Continue with --resume.\n"


@pytest.mark.parametrize("other_stop, terminated", [((0.0, 1.0), True), ((1.0, 0.0), False), ((1.0, 1.0), True)])
def test_a_stop_requested_on_another_rank_stops_this_one_at_the_step_boundary(tmp_path, other_stop, terminated):
    """The other rank got a signal: this rank (no signal of its own) stops before its next step, saves
    the last completed one, and reports the other rank's kind (SIGTERM wins over Ctrl-C)."""
    loop = _loop(tmp_path, max_steps=6)
    loop.accelerator = FakeAccelerator()
    calls = _scripted(loop)
    steps = []
    original = loop.one_step

    def one_step():
        steps.append(loop.state.step + 1)
        if loop.state.step + 1 == 3:
            loop.accelerator.other_stop = other_stop  # arrives during step 3
        return original()

    loop.one_step = one_step
    result = loop.run(show_progress=False)
    assert steps == [1, 2, 3] and calls["saved"] == [(3, True)]
    assert result.interrupted and result.terminated == terminated and result.steps == 3


def test_an_interrupt_on_another_rank_is_silent(tmp_path, capsys):
    loop = _loop(tmp_path, max_steps=6)
    loop.accelerator = FakeAccelerator()
    loop.accelerator.is_main_process = False
    _scripted(loop, interrupt_at=1)
    assert loop.run(show_progress=True).interrupted
    assert capsys.readouterr().err == ""


def test_progress_bar_only_when_asked_on_the_main_process(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(training, "TrainingProgress", lambda total, start, enabled: made.append((total, start, enabled)) or _NoBar())
    for show in (True, False):
        loop = _loop(tmp_path, max_steps=4, state=TrainState(step=1))
        _scripted(loop)
        loop.run(show_progress=show)
    assert made == [(4, 1, True), (4, 1, False)]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass


# ---------------------------------------------------------------------------------------------
# manifest, export, method setup, resume restore
# ---------------------------------------------------------------------------------------------
def test_manifest_extra_fields(tmp_path, monkeypatch):
    import hashlib

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)  # 8 frozen, 3 trainable
    recipe = SimpleNamespace(method=SimpleNamespace(name="lora", regularizers=[SimpleNamespace(name="ewc"), SimpleNamespace(name="kl")]),
                             data=SimpleNamespace(train=str(data)))  # fmt: skip
    method = SimpleNamespace(ctx=SimpleNamespace(target_modules=["0", "1"]))
    truncation = SimpleNamespace(limit=32, truncated=1)
    extra = training._manifest_extra(recipe, "fp", model, method, truncation, 5, SimpleNamespace(num_processes=1))
    assert extra == {
        "model_fingerprint": "fp",
        "method": "lora",
        "regularizers": ["ewc", "kl"],
        "target_modules": ["0", "1"],
        "trainable_parameters": 3,
        "data": {"train": str(data), "train_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "examples": 5},
        "truncation": {"limit": 32, "truncated": 1},
        "num_processes": 1,
        "torch_threads": torch.get_num_threads(),
        "distributed": "none",
    }
    for processes, kind in ((2, "ddp"), (3, "ddp")):
        assert training._manifest_extra(recipe, "fp", model, method, truncation, 5, SimpleNamespace(num_processes=processes))["distributed"] == kind
    monkeypatch.setattr(training, "is_sharded", lambda m: m is model)  # as if FSDP had sharded it
    assert training._manifest_extra(recipe, "fp", model, method, truncation, 5, SimpleNamespace(num_processes=2))["distributed"] == "fsdp"


class Exporter:
    """``export`` writes a ``config.json`` (full weights) at the top, and in ``merged/`` when merging."""

    base_ref = "org/base-model"

    def __init__(self):
        self.calls = []

    def export(self, model, folder, tokenizer, merge):
        self.calls.append((model, folder.name, tokenizer, merge))
        (folder / "config.json").write_text("{}")
        if merge:
            (folder / "merged").mkdir()
            (folder / "merged" / "config.json").write_text("{}")


def test_export_final_renames_a_complete_folder_with_model_cards(tmp_path):
    from preserve_core.models import write_model_card

    recipe = SimpleNamespace(run_dir=lambda: tmp_path, output=SimpleNamespace(merge=True))
    for stale in ("final", ".tmp-final"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk").write_text("x")
    method, model, tokenizer = Exporter(), nn.Linear(1, 1), object()
    final = training.export_final(recipe, FakeAccelerator(), method, model, tokenizer)
    assert final == tmp_path / "final" and not (tmp_path / ".tmp-final").exists()
    assert method.calls == [(model, ".tmp-final", tokenizer, True)]
    assert sorted(p.name for p in final.iterdir()) == ["README.md", "config.json", "merged"]
    (tmp_path / "card").mkdir()
    write_model_card(tmp_path / "card", "org/base-model")
    card = (tmp_path / "card" / "README.md").read_text()
    assert (final / "README.md").read_text() == card and (final / "merged" / "README.md").read_text() == card


def test_export_final_gathers_sharded_weights_on_every_rank(tmp_path, monkeypatch):
    from contextlib import contextmanager

    gathered = []

    @contextmanager
    def full_parameters(model, is_main, trainable_only):
        gathered.append((model, is_main, trainable_only))
        yield

    model = nn.Linear(1, 1)
    monkeypatch.setattr(training, "is_sharded", lambda m: m is model)
    monkeypatch.setattr(training, "full_parameters", full_parameters)
    recipe = SimpleNamespace(run_dir=lambda: tmp_path, output=SimpleNamespace(merge=False))
    training.export_final(recipe, FakeAccelerator(), Exporter(), model, None)
    assert gathered == [(model, True, False)] and (tmp_path / "final" / "config.json").exists()


def test_export_final_on_another_rank_writes_nothing(tmp_path):
    recipe = SimpleNamespace(run_dir=lambda: tmp_path, output=SimpleNamespace(merge=False))
    accelerator = FakeAccelerator()
    accelerator.is_main_process = False
    method = Exporter()
    assert training.export_final(recipe, accelerator, method, nn.Linear(1, 1), None) == tmp_path / "final"
    assert method.calls == [] and list(tmp_path.iterdir()) == []


def test_export_final_without_full_weights_has_no_card(tmp_path):
    class AdapterOnly(Exporter):
        def export(self, model, folder, tokenizer, merge):
            self.calls.append(merge)
            (folder / "adapter_model.safetensors").write_text("")

    recipe = SimpleNamespace(run_dir=lambda: tmp_path / "nested" / "run", output=SimpleNamespace(merge=False))
    final = training.export_final(recipe, FakeAccelerator(), AdapterOnly(), nn.Linear(1, 1), None)
    assert [p.name for p in final.iterdir()] == ["adapter_model.safetensors"]


def test_setup_method_builds_the_context_and_calibrates_only_when_needed(write_recipe, monkeypatch):
    from preserve_core.models import load_model, load_tokenizer, resolve_target_modules
    from preserve_core.recipe import load_recipe

    recipe = load_recipe(write_recipe(model={"target_modules": ["q_proj", "v_proj"]}))
    accelerator = Accelerator(cpu=True)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, accelerator.device)
    targets = resolve_target_modules(model, ["q_proj", "v_proj"])
    method, prepared, regularizers = training.setup_method(recipe, model, tokenizer, accelerator)
    ctx = method.ctx
    assert type(method).__name__ == "Lora" and len(regularizers) == 0
    assert (ctx.recipe, ctx.tokenizer, ctx.target_modules, ctx.device, ctx.calibration, ctx.is_main_process) == (
        recipe, tokenizer, targets, accelerator.device, None, True)  # fmt: skip
    assert len(targets) == 4 and any("lora_A" in n for n, _ in prepared.named_parameters())
    calls = []
    monkeypatch.setattr("preserve_core.calibration.ensure_calibration", lambda *args: calls.append(args) or "stats")
    monkeypatch.setattr(training, "regularizer_needs", lambda regs: {"preserve"})
    made = []

    class Recorded:
        def __init__(self, configs, ctx):
            made.append(("init", configs, ctx))

        def attach(self, model, method):
            made.append(("attach", model, method))

    monkeypatch.setattr(training, "Regularizers", Recorded)
    model = load_model(recipe.model, accelerator.device)
    method, prepared, regularizers = training.setup_method(recipe, model, tokenizer, accelerator)
    assert method.ctx.calibration == "stats" and calls == [(recipe, model, tokenizer, type(method), accelerator)]
    assert made == [("init", recipe.method.regularizers, method.ctx), ("attach", prepared, method)]
    assert isinstance(regularizers, Recorded)


def test_restore_keeps_the_checkpoint_schedule_or_applies_accepted_changes(tmp_path):
    def build(lr):
        model = nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    model, opt, sched = build(0.1)
    for _ in range(3):
        opt.step()
        sched.step()
    method = SimpleNamespace(trainable_state=lambda m: {"weight": m.weight}, state_dict=lambda: {},
                             load_trainable_state=lambda m, s: None)  # fmt: skip
    regs = SimpleNamespace(state_dict=lambda: {"ewc/f": torch.ones(2)})
    path = save_checkpoint(tmp_path, TrainState(step=3), method, model, opt, sched, 2, regs)
    for changes, lr in (({}, 0.1 / 4), ({"training.lr": [0.1, 0.01]}, 0.01 / 4)):
        model, opt, sched = build(0.01)
        loaded = []
        regs = SimpleNamespace(load_state_dict=loaded.append)
        state = training._restore(training.ResumePoint(path, changes), method, model, opt, sched, regs)
        assert state.step == 3 and opt.param_groups[0]["lr"] == pytest.approx(lr) and sched.last_epoch == 3
        assert [sorted(d) for d in loaded] == [["ewc/f"]]


def test_a_run_and_its_resume_record_what_happened(write_recipe, tiny_task_file):
    """Manifest, metrics, checkpoints and final folder of a 3-step LoRA run, then of its resume from step 2.

    LoRA r = 4 on the 7 projections of 2 layers (hidden 32, kv 16, MLP 64): 4 (in + out) each,
    ``2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96) = 4096`` trainable parameters."""
    import json

    from conftest import rewind_to_previous_checkpoint, run_recipe

    path = write_recipe(data={"eval": str(tiny_task_file)},
                        training={"max_steps": 3, "save_every": 2, "keep_last": 3, "eval_every": 2})  # fmt: skip
    result = run_recipe(path)
    run_dir = result.run_dir
    assert (result.final_dir, result.steps, result.interrupted) == (run_dir / "final", 3, False)
    assert (run_dir / "final" / "adapter_model.safetensors").exists() and not (run_dir / ".tmp-final").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000002", "checkpoint-000003"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "loss", "lr", "tokens_per_s", "step_seconds", "grad_norm", "tokens"}
    assert [(m["step"], set(m)) for m in lines] == [(1, keys), (2, keys), (2, {"step", "eval_loss"}), (3, keys)]
    assert lines == result.metrics
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(manifest["target_modules"]) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in parts)
    assert (manifest["method"], manifest["regularizers"], manifest["trainable_parameters"]) == ("lora", [], 4096)
    assert (manifest["data"]["examples"], manifest["num_processes"], manifest["distributed"]) == (64, 1, "none")
    assert "resumed" not in manifest and manifest["model_fingerprint"]

    assert rewind_to_previous_checkpoint(run_dir).name == "checkpoint-000002"
    resumed = run_recipe(path, resume=True)
    assert resumed.steps == 3 and resumed.final_dir == run_dir / "final"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed"] == {"checkpoint": "checkpoint-000002", "recipe_changes": {}, "step": 2}
    again = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    event = {"step": 2, "event": "resume", "checkpoint": "checkpoint-000002", "recipe_changes": {}}
    assert again[:3] == lines[:3] and again[3] == event and again[4]["step"] == 3 and len(again) == 5
    assert again[4]["tokens"] == lines[3]["tokens"]  # the token count came back with the checkpoint
    assert again[4]["loss"] == pytest.approx(lines[3]["loss"], abs=1e-6)


def test_train_wires_lock_run_folder_resume_and_defaults(tmp_path, monkeypatch):
    """``train``'s own steps, each replaced by a recorder: what it calls, with which arguments, in order."""
    from contextlib import contextmanager

    calls = []

    @contextmanager
    def lock(run_dir):
        calls.append(("lock", run_dir))
        yield
        calls.append(("unlock", run_dir))

    accelerator = FakeAccelerator()
    accelerator.num_processes = 1
    recipe = SimpleNamespace(training=SimpleNamespace(threads=3), output=SimpleNamespace(overwrite=True), run_dir=lambda: tmp_path)
    monkeypatch.setattr(training, "set_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(training, "fsdp_settings", lambda r: calls.append(("fsdp", r)) or "fsdp-settings")
    monkeypatch.setattr(training, "check_fsdp_recipe", lambda r, s: calls.append(("check", r, s)))
    monkeypatch.setattr(training, "make_accelerator", lambda r: calls.append(("accelerator", r)) or accelerator)
    monkeypatch.setattr(training, "run_lock", lock)
    monkeypatch.setattr(training, "prepare_run_dir", lambda *args: calls.append(("prepare", *args)))
    monkeypatch.setattr(training, "resume_checkpoint", lambda run_dir: calls.append(("resume", run_dir)) or tmp_path / "ck")
    monkeypatch.setattr(training, "check_recipe_changes", lambda *args: calls.append(("changes", *args)) or {"k": [1, 2]})
    monkeypatch.setattr(training, "_train_locked", lambda *args: calls.append(("locked", *args)) or "result")

    assert training.train(recipe) == "result"
    assert calls == [("threads", 3), ("fsdp", recipe), ("check", recipe, "fsdp-settings"), ("accelerator", recipe),
                     ("lock", tmp_path), ("prepare", tmp_path, False, True),
                     ("locked", recipe, accelerator, tmp_path, None, True, "fsdp-settings"), ("unlock", tmp_path)]  # fmt: skip
    calls.clear()
    monkeypatch.setattr(training, "fsdp_settings", lambda r: None)
    monkeypatch.setattr(training, "check_fsdp_recipe", lambda r, s: pytest.fail("no FSDP settings to check"))
    training.train(recipe, resume=True, show_progress=False)
    start = training.ResumePoint(tmp_path / "ck", {"k": [1, 2]})
    assert calls == [("threads", 3), ("accelerator", recipe), ("lock", tmp_path), ("prepare", tmp_path, True, True),
                     ("resume", tmp_path), ("changes", recipe, tmp_path / "ck", False),
                     ("locked", recipe, accelerator, tmp_path, start, False, None), ("unlock", tmp_path)]  # fmt: skip
    calls.clear()
    accelerator.is_main_process = False  # other ranks neither lock nor prepare the folder
    training.train(recipe, resume=True, allow_changes=True)
    assert [c[0] for c in calls] == ["threads", "accelerator", "resume", "changes", "locked"] and calls[3][-1] is True


def test_checkpoint_write_holds_interrupts_and_gathers_when_sharded(tmp_path, monkeypatch):
    """The write runs inside ``deferred_interrupts`` (delivering a held Ctrl-C only if the run goes on);
    under FSDP the trainable weights and the optimizer state are gathered first and the gathered state saved."""
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def deferred(notice=None, deliver=True):
        seen.append(("deferred", notice, deliver))
        yield

    @contextmanager
    def full_parameters(model, is_main, trainable_only):
        seen.append(("gather", model, is_main, trainable_only))
        yield

    gathered = {"state": {}, "param_groups": [{"lr": 0.25, "params": [0]}]}
    monkeypatch.setattr(training, "deferred_interrupts", deferred)
    monkeypatch.setattr(training, "full_parameters", full_parameters)
    monkeypatch.setattr(training, "full_optimizer_state", lambda opt: seen.append(("optimizer", opt)) or gathered)
    loop = _loop(tmp_path, state=TrainState(step=1))
    loop.method.trainable_state = lambda model: {"w": model.w}
    loop.method.state_dict = lambda: {}
    loop.state.step = 2
    loop.checkpoint()
    loop.state.step = 3
    loop.checkpoint(interrupted=True)
    notice = "Interrupt: finishing the checkpoint write first."
    assert seen == [("deferred", notice, True), ("deferred", notice, False)]
    seen.clear()
    loop.sharded = True
    loop.state.step = 4
    path = loop.checkpoint()
    assert seen == [("gather", loop.model, True, True), ("optimizer", loop.optimizer), ("deferred", notice, True)]
    assert torch.load(path / "state.pt", weights_only=True)["optimizer"] == gathered
