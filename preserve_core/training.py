"""The training engine: one loop for every method, on Accelerate.

Steps count optimizer updates. Data order is a function of (seed, epoch) alone and each rank takes
every ``world``-th example of the epoch's permutation, so ``--resume`` replays exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.nn.utils import get_total_norm

from .checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .checkpoint_integrity import newest_intact
from .data import (
    build_eval_dataset, build_train_dataset, check_packing_support, collate, data_fingerprint, pack, pad_id_of,
)  # fmt: skip
from .errors import PPFTError, RecipeError, TrainingDiverged
from .guards import (
    STOP_INTERRUPT,
    STOP_TERMINATE,
    LossWatch,
    Terminated,
    all_finite,
    coordinated_interrupts,
    deferred_interrupts,
    optimizer_tensors,
    sigterm_as_interrupt,
    stop_requested,
)
from .methods import METHODS, MethodContext
from .methods.base import unwrap_model
from .methods.regularizers import Regularizers, regularizer_needs
from .models import load_model, load_tokenizer, model_fingerprint, resolve_target_modules, write_model_card
from .progress import TrainingProgress, notice
from .runlock import run_lock
from .resume import apply_new_hyperparameters, check_recipe_changes, optimizer_hyperparameters, resume_checkpoint
from .runs import MetricsLog, prepare_run_dir, write_manifest
from .threads import set_threads
from .sharding import (
    all_ranks_true,
    check_fsdp_recipe,
    clip_sharded_gradients,
    fsdp_settings,
    full,
    full_optimizer_state,
    full_parameters,
    is_sharded,
    local,
    shard_model,
)

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    final_loss: float
    interrupted: bool = False
    terminated: bool = False  # the interrupt was a SIGTERM (exit 143), not Ctrl-C (exit 130)
    metrics: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = field(default=None, repr=False)


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of example indices for ``epoch`` (a seeded permutation, sharded by rank)."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    mine = order[rank::world]
    usable = len(mine) - len(mine) % batch_size if len(mine) >= batch_size else len(mine)
    return [mine[i : i + batch_size] for i in range(0, usable, batch_size)]


class BatchStream:
    """An endless stream of collated batches that knows its (epoch, position) for checkpoints.

    ``packing``: lay each batch's examples end to end in rows no longer than its longest example
    (:func:`~preserve_core.data.pack`) instead of padding every row to it: never more rows, never
    longer ones. Which examples form a batch, and so resume, does not change. ``last_tokens``: the
    real (non-padding) tokens of the last batch.
    """

    def __init__(self, dataset, batch_size: int, seed: int, pad_id: int, rank: int, world: int, state: TrainState,
                 packing: bool = False):  # fmt: skip
        self.dataset, self.batch_size, self.seed, self.pad_id = dataset, batch_size, seed, pad_id
        self.rank, self.world, self.packing = rank, world, packing
        self.epoch, self.position = state.epoch, state.position
        self.last_tokens = 0
        self._batches = self._epoch(self.epoch)

    def _epoch(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world)
        if not batches:
            raise RecipeError("data: fewer training examples than processes; add data or use fewer processes")
        return batches

    def next(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        indices = self._batches[self.position]
        self.position += 1
        features = [self.dataset[i] for i in indices]
        self.last_tokens = sum(len(f["input_ids"]) for f in features)
        if self.packing:
            return pack(features, self.pad_id, width=max(len(f["input_ids"]) for f in features))
        return collate(features, self.pad_id)


def build_scheduler(optimizer, training):
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[training.schedule], optimizer, num_warmup_steps=training.warmup_steps, num_training_steps=training.max_steps
    )


def make_accelerator(recipe) -> Accelerator:
    precision = recipe.training.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        precision = "no"
    timeout = recipe.training.distributed.timeout_s
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else []
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch use gloo DDP on CPU
        mixed_precision=precision,
        gradient_accumulation_steps=recipe.training.grad_accum,
        kwargs_handlers=handlers,
    )


def setup_method(recipe, model, tokenizer, accelerator):
    """Instantiate the recipe's method and its regularisers (running or reusing calibration when
    either needs one), prepare the model, attach the regularisers; returns ``(method, model, regularizers)``."""
    method_cls = METHODS[recipe.method.name]
    targets = resolve_target_modules(model, recipe.model.target_modules)
    calibration = None
    if method_cls.needs_for(recipe.method) | regularizer_needs(recipe.method.regularizers):
        from .calibration import ensure_calibration

        calibration = ensure_calibration(recipe, model, tokenizer, method_cls, accelerator)
    ctx = MethodContext(
        recipe=recipe,
        tokenizer=tokenizer,
        target_modules=targets,
        device=accelerator.device,
        calibration=calibration,
        is_main_process=accelerator.is_main_process,
    )
    method = method_cls(recipe.method, ctx)
    model = method.prepare_model(model)
    regularizers = Regularizers(recipe.method.regularizers, ctx)
    regularizers.attach(model, method)
    return method, model, regularizers


@dataclass
class ResumePoint:
    """The checkpoint ``--resume`` continues from, and the recipe changes accepted since it (``resume.py``)."""

    checkpoint: Path
    changes: dict[str, list]


def train(recipe, resume: bool = False, show_progress: bool = True, allow_changes: bool = False) -> TrainResult:
    """Fine-tune per ``recipe``; writes checkpoints, metrics, manifest and ``<run_dir>/final``.

    ``resume``: continue from the newest intact checkpoint; ``allow_changes``: accept a recipe that
    differs from the checkpoint's (see :mod:`preserve_core.resume`).
    """
    set_threads(recipe.training.threads)
    settings = fsdp_settings(recipe)
    if settings is not None:
        check_fsdp_recipe(recipe, settings)
    accelerator = make_accelerator(recipe)
    run_dir = recipe.run_dir()
    with run_lock(run_dir) if accelerator.is_main_process else nullcontext():
        if accelerator.is_main_process:
            prepare_run_dir(run_dir, resume, recipe.output.overwrite)
        accelerator.wait_for_everyone()
        start = None
        if resume:
            checkpoint = resume_checkpoint(run_dir)
            start = ResumePoint(checkpoint, check_recipe_changes(recipe, checkpoint, allow_changes))
        with _interrupt_handling(accelerator):
            return _train_locked(recipe, accelerator, run_dir, start, show_progress, settings)


def _interrupt_handling(accelerator):
    """One process: SIGTERM raises like Ctrl-C, wherever it lands. Several: both only record a request,
    which the loop agrees on at the next step boundary (every rank stops after the same step)."""
    if accelerator.num_processes == 1:
        return sigterm_as_interrupt()
    message = "Stop requested: every process stops after this step and saves it (again to stop at once)."
    return coordinated_interrupts(message if accelerator.is_main_process else None)


def _restore(start: ResumePoint, method, model, optimizer, scheduler, regularizers) -> TrainState:
    """Load the checkpoint; with accepted changes, the new recipe's optimizer settings and schedule apply."""
    fresh = optimizer_hyperparameters(optimizer)
    state = load_checkpoint(start.checkpoint, method, model, optimizer, scheduler, regularizers)
    if start.changes:
        apply_new_hyperparameters(optimizer, scheduler, fresh, state.step)
    return state


def _train_locked(recipe, accelerator, run_dir: Path, start: ResumePoint | None, show_progress: bool, settings) -> TrainResult:
    """The run itself, once rank 0 holds the run folder's lock; ``start``: where to resume from;
    ``settings``: FSDP settings (None: DDP or one process)."""
    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, accelerator.device)
    fingerprint = model_fingerprint(model)
    method, model, regularizers = setup_method(recipe, model, tokenizer, accelerator)
    dataset, truncation = build_train_dataset(recipe, tokenizer)
    if start is None and method.init_rows():  # on resume the checkpoint holds what it would set
        method.init_from_data(model, init_batches(dataset, method.init_rows(), recipe, tokenizer, accelerator.device))
    sharded = settings is not None and accelerator.num_processes > 1
    if sharded:
        model = shard_model(model, accelerator.device, settings, accelerator.mixed_precision)
        method.on_sharded(model)
    dataset = regularizers.training_data(method.training_data(dataset))
    eval_set, _ = build_eval_dataset(recipe, tokenizer)
    optimizer = method.build_optimizer(model, recipe.training)
    scheduler = build_scheduler(optimizer, recipe.training)
    state = _restore(start, method, model, optimizer, scheduler, regularizers) if start else TrainState()
    state.recipe = recipe.resolved()
    if not sharded:  # FSDP already distributed the model; Accelerate's own FSDP path would re-create the parameters
        model, optimizer = accelerator.prepare(model, optimizer)
    log = MetricsLog(run_dir, accelerator.is_main_process, recipe.training.tensorboard, state.step if start else None)
    resumed = {}
    if start is not None:
        resumed = {"checkpoint": start.checkpoint.name, "recipe_changes": start.changes}
        log.log(state.step, event="resume", **resumed)
        resumed["step"] = state.step
    if accelerator.is_main_process:
        extra = _manifest_extra(recipe, fingerprint, model, method, truncation, len(dataset), accelerator)
        extra["weight_decay"] = optimizer.param_groups[0]["weight_decay"]  # what applies (weight_decay_timescale)
        write_manifest(run_dir, recipe, {**extra, "resumed": resumed} if resumed else extra)
    loop = TrainingLoop(recipe, accelerator, model, optimizer, scheduler, method, tokenizer, dataset, eval_set, log, state)
    loop.regularizers = regularizers  # the loop adds their loss terms and checkpoints their state
    try:
        result = loop.run(show_progress)
    finally:
        log.close()
    if not result.interrupted:
        result.final_dir = export_final(recipe, accelerator, method, model, tokenizer)
    result.model = model if sharded else unwrap_model(model)
    return result


def init_batches(dataset, rows: int, recipe, tokenizer, device):
    """The first ``rows`` training rows in order, collated ``training.batch_size`` at a time, on ``device``."""
    pad = pad_id_of(tokenizer)  # as the training stream pads
    rows = min(rows, len(dataset))
    for start in range(0, rows, recipe.training.batch_size):
        features = [dataset[i] for i in range(start, min(start + recipe.training.batch_size, rows))]
        yield {k: v.to(device) for k, v in collate(features, pad).items()}


def _manifest_extra(recipe, fingerprint, model, method, truncation, n_examples, accelerator) -> dict:
    return {
        "model_fingerprint": fingerprint,
        "method": recipe.method.name,
        "regularizers": [r.name for r in recipe.method.regularizers],
        "target_modules": method.ctx.target_modules,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data": {"train": recipe.data.train, "train_sha256": data_fingerprint(recipe.data.train), "examples": n_examples},
        "truncation": vars(truncation),
        "num_processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "distributed": "fsdp" if is_sharded(model) else ("ddp" if accelerator.num_processes > 1 else "none"),
    }


def export_final(recipe, accelerator, method, model, tokenizer) -> Path:
    """Export on rank 0 into a temporary folder, then rename it to ``<run_dir>/final`` (FSDP: from gathered weights)."""
    final = recipe.run_dir() / "final"
    accelerator.wait_for_everyone()
    gathered = full_parameters(model, accelerator.is_main_process, trainable_only=False) if is_sharded(model) else nullcontext()
    with gathered:
        if accelerator.is_main_process:
            tmp = recipe.run_dir() / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            method.export(unwrap_model(model), tmp, tokenizer, recipe.output.merge)
            for folder in (tmp, tmp / "merged"):  # full weights: say which base they came from
                if (folder / "config.json").exists():
                    write_model_card(folder, method.base_ref)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


class TrainingLoop:
    """Runs optimizer steps from ``state.step`` to ``training.max_steps``."""

    def __init__(self, recipe, accelerator, model, optimizer, scheduler, method, tokenizer, dataset, eval_set, log, state):
        self.recipe, self.cfg = recipe, recipe.training
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.method, self.tokenizer, self.eval_set, self.log, self.state = method, tokenizer, eval_set, log, state
        pad = pad_id_of(tokenizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        if recipe.data.packing:
            check_packing_support(unwrap_model(model), len(tokenizer))
        self.stream = BatchStream(dataset, self.cfg.batch_size, self.cfg.seed, pad, rank, world, state, recipe.data.packing)
        self.pad_id = pad
        self.metrics: list[dict] = []
        self.saved_step = state.step if state.step else None  # a resumed run's checkpoint exists already
        self.retention = None
        self.regularizers = Regularizers([], None)
        self.sharded = is_sharded(model)
        self.loss_watch = LossWatch.from_state(state.loss_watch)

    def run(self, show_progress: bool) -> TrainResult:
        from .retention import RetentionTracker

        self.retention = RetentionTracker.maybe(self.recipe, self.tokenizer, self.accelerator, self.model)
        loss = float("nan")
        progress = TrainingProgress(self.cfg.max_steps, self.state.step, show_progress and self.accelerator.is_main_process)
        try:
            with progress:
                while self.state.step < self.cfg.max_steps:
                    self._stop_if_any_rank_asked()
                    loss, tokens, seconds, grad_norm = self.one_step()
                    self.after_step(loss, tokens, seconds, grad_norm, progress)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            path = self.checkpoint(interrupted=True)
            if self.accelerator.is_main_process:
                what = "Terminated (SIGTERM)" if terminated else "Interrupted"
                print(f"{what}: saved {path}. Continue with --resume.", file=sys.stderr)
            return TrainResult(self.recipe.run_dir(), None, self.state.step, loss, interrupted=True,
                               terminated=terminated, metrics=self.metrics)  # fmt: skip
        if self.cfg.save_every == 0 or self.state.step % self.cfg.save_every:
            self.checkpoint()
        return TrainResult(self.recipe.run_dir(), None, self.state.step, loss, metrics=self.metrics)

    def _stop_if_any_rank_asked(self) -> None:
        """Several processes: raise the strongest stop request of any rank (SIGTERM over Ctrl-C), on every
        rank at this same step boundary. One all-reduce per step: the count of ranks holding each request."""
        if self.accelerator.num_processes == 1:
            return
        mine = stop_requested()
        flags = torch.tensor([float(mine == STOP_INTERRUPT), float(mine == STOP_TERMINATE)], device=self.accelerator.device)
        interrupts, terminates = self.accelerator.reduce(flags, "sum").tolist()
        if terminates:
            raise Terminated
        if interrupts:
            raise KeyboardInterrupt

    def one_step(self) -> tuple[float, int, float, float | None]:
        """One optimizer update over ``grad_accum`` micro-batches; returns (loss, tokens, seconds, grad norm)."""
        start = time.perf_counter()
        self.model.train()
        total, tokens = 0.0, 0
        for micro in range(self.cfg.grad_accum):
            batch = {k: v.to(self.accelerator.device) for k, v in self.stream.next().items()}
            with self.accelerator.accumulate(self.model), self.accelerator.autocast():
                outputs = self.model(**batch, use_cache=False)  # no cache: packed rows are read from position ids
                loss = outputs.loss
                extra = self.extra_loss(batch, outputs)
                if extra is not None:
                    loss = loss + full(extra)
                self.accelerator.backward(loss)  # Accelerate divides by grad_accum
            total += loss.detach().float().item() / self.cfg.grad_accum
            tokens += self.stream.last_tokens
        total = self._mean_over_ranks(total)
        if not math.isfinite(total):
            self._diverged(f"the loss became {total}")
        grad_norm = self._clip_gradients()
        with deferred_interrupts():  # the update and the step count it belongs to change together
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self.method.after_step(self.model, self.optimizer, self.state.step)
            self.state.epoch, self.state.position = self.stream.epoch, self.stream.position
            if not self._state_finite():
                self._diverged("the update made trainable weights or optimizer state non-finite", step=self.state.step)
        tokens = int(self._sum_over_ranks(tokens))
        self.state.tokens += tokens
        return total, tokens, time.perf_counter() - start, grad_norm

    def extra_loss(self, batch: dict, outputs) -> torch.Tensor | None:
        """The method's extra loss, then its regularisers' (in that order: FoLoRA reads the task
        batch's layer inputs before a regulariser's own forward passes), summed; None if neither adds one."""
        terms = [self.method.extra_loss(self.model, batch, outputs), self.regularizers.extra_loss(self.model, batch, outputs)]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _clip_gradients(self) -> float | None:
        """Clip to ``max_grad_norm`` (if set) and return the global L2 gradient norm; stop if it is not finite.

        Under fp16 loss scaling a non-finite gradient is expected now and then: the scaler skips that
        update and lowers the scale, so it is not divergence.
        """
        params = self._trainable()
        scaled = self.accelerator.scaler is not None
        if self.sharded:
            grad_norm = clip_sharded_gradients(params, self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm))
        elif scaled:
            return None
        else:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = float(get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(grad_norm) and not scaled:
            self._diverged(f"the gradient norm became {grad_norm}")
        return grad_norm

    def _state_finite(self) -> bool:
        """Trainable weights and optimizer state (moments) all finite: one fused max-abs reduction
        (FSDP: over this rank's rows, then and-ed over ranks)."""
        finite = all_finite([local(t) for t in (*self._trainable(), *optimizer_tensors(self.optimizer))])
        return all_ranks_true(finite, self.accelerator.device) if self.sharded else finite

    def _mean_over_ranks(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, "mean"))

    def _sum_over_ranks(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, "sum"))

    def _diverged(self, what: str, step: int | None = None):
        """Stop: nothing is saved from the bad state; name the checkpoint a resume would use."""
        step = self.state.step + 1 if step is None else step
        good, _ = newest_intact(list_checkpoints(self.recipe.run_dir()))
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it"
        lower = f"{self.cfg.lr / 10:g}" if math.isfinite(self.cfg.lr) else "1e-4"
        again = f"--resume --allow-changes --set training.lr={lower}" if good else f"--set training.lr={lower}"
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}; stopped without saving it ({where}). "
            f"Lower the learning rate (training.lr is {self.cfg.lr:g}; try {again}), "
            "enable clipping (training.max_grad_norm), or check the data."
        )

    def after_step(self, loss: float, tokens: int, seconds: float, grad_norm, progress) -> None:
        step, cfg = self.state.step, self.cfg
        lr = self.scheduler.get_last_lr()[0]
        progress.update(step, loss=loss, lr=lr, tokens_per_s=tokens / max(seconds, 1e-9))
        self._watch_loss(step, loss)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            self._log(
                step, loss=loss, lr=lr, tokens_per_s=tokens / max(seconds, 1e-9), step_seconds=seconds,
                grad_norm=grad_norm, tokens=self.state.tokens,
            )  # fmt: skip
        if cfg.eval_every and self.eval_set is not None and step % cfg.eval_every == 0:
            self._log(step, eval_loss=self.eval_loss())
        if self.retention is not None and step % self.recipe.eval.every_n_steps == 0:
            self._log(step, **self.retention.measure(self.model))
        if cfg.save_every and step % cfg.save_every == 0:
            self.checkpoint()

    def _watch_loss(self, step: int, loss: float) -> None:
        """Warn once (and log a ``loss_rising`` event) when the loss has doubled from its best point."""
        rising = self.loss_watch.update(loss)
        if rising is None:
            return
        best, average = rising
        self.log.log(step, event="loss_rising", loss_best=best, loss_average=average)
        if self.accelerator.is_main_process:
            notice(
                f"the training loss rose from {best:.3g} (its lowest moving average) to {average:.3g} at step "
                f"{step}: the run is probably collapsing with finite numbers. Lower training.lr (now "
                f"{self.cfg.lr:g}) or set training.max_grad_norm; the run continues."
            )

    def _log(self, step: int, **values) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        self.metrics.append({"step": step, **values})
        self.log.log(step, **values)

    @torch.no_grad()
    def eval_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.eval_set), self.cfg.batch_size):
            rows = [self.eval_set[i] for i in range(start, min(start + self.cfg.batch_size, len(self.eval_set)))]
            batch = {k: v.to(self.accelerator.device) for k, v in collate(rows, self.pad_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(self.model(**batch).loss) * n
            count += n
        return self._mean_over_ranks(total / max(count, 1))

    def checkpoint(self, interrupted: bool = False) -> Path | None:
        """Save the current state (rank 0), only if every trainable weight and optimizer value is finite.

        Ctrl-C during the write is held back until it completes (after an interrupt, dropped: the run is
        stopping anyway). A step already saved (or resumed from) is not written again.
        """
        if self.saved_step == self.state.step:
            return self.recipe.run_dir() / f"checkpoint-{self.state.step:06d}"
        if not self._state_finite():
            self._diverged("trainable weights or optimizer state are non-finite", step=self.state.step)
        self.accelerator.wait_for_everyone()
        path = None
        main = self.accelerator.is_main_process
        self.state.loss_watch = self.loss_watch.state()  # rank 0's watch travels in its checkpoint
        with full_parameters(self.model, main, trainable_only=True) if self.sharded else nullcontext():
            optimizer_state = full_optimizer_state(self.optimizer) if self.sharded else None  # collective
            if main:
                model = unwrap_model(self.model)
                with deferred_interrupts("Interrupt: finishing the checkpoint write first.", deliver=not interrupted):
                    path = save_checkpoint(
                        self.recipe.run_dir(), self.state, self.method, model, self.optimizer, self.scheduler,
                        self.cfg.keep_last, self.regularizers, optimizer_state,
                    )  # fmt: skip
                    self.saved_step = self.state.step  # before a held-back Ctrl-C is delivered
        self.saved_step = self.state.step
        self.accelerator.wait_for_everyone()
        return path


def check_runtime(recipe) -> None:
    """Fail early, with a clear message, on settings this machine cannot run."""
    if recipe.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PPFTError("training.mixed_precision: fp16 needs a GPU; use 'no' on CPU")
