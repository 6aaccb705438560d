"""``folora``: foundation-preserving LoRA by a generalized Rayleigh quotient, with direction-wise gated Adam.

Per target linear ``W`` [m, n] with LoRA ``dW = (alpha/r) B A``: solve ``C_t v = lambda (C_p + eps I) v``
(:mod:`.basis`), write ``A = A~ V_K^T`` (:mod:`.layer`), train ``A~`` [r, K] with Adam steps
scaled per column by ``g(lambda_i)`` and ``B`` with plain AdamW (:mod:`.gated_adam`). Optional: a
``gamma`` schedule and periodic re-estimation of ``C_t`` (:mod:`.refresh`). Exports a stock
PEFT LoRA with ``A = A~ V_K^T``. See docs/methods/folora.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ...calibration.batches import refresh_batches
from ...calibration.stats import current_covs, stats_budget_bytes
from ...errors import PPFTError
from ..adapter_export import save_lora_factors_as_peft
from ..base import PRESERVE_STATS, TASK_STATS, Method, MethodOptions
from .basis import (
    Basis,
    damped_preserve,
    gamma_of,
    gate_values,
    generalized_basis,
    quantile_at,
    resolve_keep,
    shrunk_task,
    transition,
)
from .layer import FoloraLinear, attach_disable_adapter, default_init_std, install, plain_linears
from .refresh import TaskWindow, in_window, mix_estimate
from ...sharding import local
from ..gradient_init import init_rows_field, task_gradients
from .gated_adam import GatedAdamW, unwrap_optimizer


def _count_or_fraction(value: int | float | None) -> int | float | None:
    if value is not None and (isinstance(value, bool) or value <= 0):
        raise ValueError("must be positive: a fraction (< 1) or a count (>= 1)")
    return value


class FoloraOptions(MethodOptions):
    name: Literal["folora"] = "folora"
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    damping: float = Field(1e-4, gt=0, description="eps = damping * tr(C_p) / n in C_t v = lambda (C_p + eps I) v.")
    task_shrinkage: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Ours: solve with (1 - s) C_t + s (tr C_t / n) I, C_t shrunk towards its mean eigenvalue (0: the "
        "spec; 1: V are C_p's eigenvectors, the top lambda the least preserve energy, FORA's complement).",
    )
    keep: int | float | None = Field(
        None, description="Directions K per layer input: None all n; < 1 a fraction of n, >= 1 a count."
    )
    gate: Literal["soft", "hard", "temperature"] = Field(
        "soft",
        description="soft: l/(l+gamma); hard: 1 on the top directions, else 0; temperature: sigmoid(log(l/gamma)/T).",
    )
    gamma_quantile: float = Field(
        0.5, ge=0, le=1, description="gamma = this quantile of a layer input's lambda (0.5: the median)."
    )
    gamma_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="constant: gamma_quantile throughout; linear: gamma_quantile_start to gamma_quantile over training",
    )
    gamma_quantile_start: float = Field(0.0, ge=0, le=1, description="Quantile at step 0 of the linear schedule.")
    hard_k: int | float | None = Field(
        None,
        description="hard gate: open exactly the top hard_k directions (< 1 a fraction of K, >= 1 a count); "
        "None: where lambda >= gamma.",
    )
    temperature: float = Field(1.0, gt=0, description="temperature gate: T (1 equals soft, towards 0 hard).")
    init: Literal["random", "gradient"] = Field(
        "random",
        description="A~'s initial rows: random normal (the spec), or (ours) the top right singular vectors of "
        "G V_K diag(d), G the dense weight's task gradient over the first init_rows training rows and d each "
        "column's step (gate times step scale), times d, at the random A's mean row norm; B stays 0.",
    )
    init_rows: int = init_rows_field("A~")
    init_gated: bool = Field(
        False, description="Scale A~'s random initial columns by their step-0 gate (ours; the spec: plain random)."
    )
    step: Literal["penalty", "euclidean", "shrink"] = Field(
        "penalty",
        description="penalty (spec): Adam steps A~ in units of forgetting penalty, so A moves lr |v_i| along v_i; "
        "euclidean (ours): column i's step and initial std are divided by |v_i|, so A moves lr along every open "
        "direction, as plain LoRA's A does; shrink (ours): euclidean times (1 + shrink_strength * p_i / mean "
        "lambda(C_p))^(-1/2), p_i the preserve energy of v_i's unit direction (FORA's residual_shrink).",
    )
    shrink_strength: float = Field(
        100.0, gt=0, le=1e12, description="step: shrink: how hard a direction's preserve energy shortens its step."
    )
    refresh_every: int = Field(0, ge=0, description="Re-estimate C_t, V and lambda every this many steps (0: never).")
    refresh_window: int = Field(
        16, ge=1, description="Optimizer steps before each refresh whose task inputs form the estimate."
    )
    refresh_mix: float = Field(
        0.5, gt=0, le=1, description="New C_t = mix * C_window + (1 - mix) * previous C_t (at first: calibration C_t)."
    )

    refresh_preserve: bool = Field(
        False,
        description="With refresh_every (ours): at each refresh also re-measure C_p on the model being trained (its "
        "activations of the first refresh_samples calibration preserve sequences), so V and lambda follow where the "
        "preserve inputs have moved; C_t is the window's estimate where there is one, else the last one.",
    )
    refresh_samples: int = Field(
        64, gt=0, le=10**7, description="refresh_preserve: calibration preserve sequences each refresh runs through."
    )

    _check_keep = field_validator("keep", "hard_k")(_count_or_fraction)

    @model_validator(mode="after")
    def _refresh_preserve_needs_refresh_every(self):
        if self.refresh_preserve and not self.refresh_every:
            raise ValueError("refresh_preserve re-measures C_p at each refresh: set refresh_every > 0 (or remove it)")
        if self.refresh_preserve and self.step == "shrink":
            raise ValueError("step: shrink reads the calibration's C_p, refresh_preserve replaces it: use one of them")
        return self


class Folora(Method):
    name = "folora"
    Options = FoloraOptions
    needs = frozenset({PRESERVE_STATS, TASK_STATS})
    is_adapter = True
    has_weight_deltas = True

    def __init__(self, options: FoloraOptions, ctx):
        super().__init__(options, ctx)
        self.wrappers: dict[str, FoloraLinear] = {}
        self.names_by_key: dict[str, list[str]] = {}
        self.step_scales: dict[str, torch.Tensor] = {}  # per-column step factor, float32 [K]
        self.values: dict[str, torch.Tensor] = {}  # lambda per input key, float64 [K]
        self.rebased: set[str] = set()  # input keys whose basis a refresh replaced (checkpointed then)
        self.gammas: dict[str, float] = {}
        self.task_covs: dict[str, torch.Tensor] = {}  # refreshed C_t estimates (CPU), when refresh_mix < 1
        self.window = TaskWindow(ctx.recipe.calibration.task_positions)
        self.step = 0
        self.window_open = False  # the next optimizer step's task inputs go into the refresh window
        self.refresh_seconds: list[float] = []

    # -- set-up ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        solved: dict[str, tuple[Basis, float]] = {}  # one float32 V_K per distinct input, shared by its layers
        for name in self.ctx.target_modules:
            key = self.ctx.calibration.input_key(name)
            if key not in solved:
                c_p = self.ctx.calibration.cov_by_key("preserve", key).to(self.ctx.device)
                basis, init_std = self._solve(key, self.ctx.calibration.cov_by_key("task", key), c_p)
                vectors = basis.vectors.to(device=self.ctx.device, dtype=torch.float32).contiguous()
                solved[key] = Basis(vectors, basis.values), init_std
                del basis  # the float64 solution: only the float32 copy lives on
                self.values[key] = solved[key][0].values
                self.step_scales[key] = self._step_scale(vectors, c_p)
                del c_p
            self.names_by_key.setdefault(key, []).append(name)
            basis, init_std = solved[key]
            self.wrappers[name] = install(model, name, lambda lin: self._wrap(lin, basis, init_std, key))
        attach_disable_adapter(model, self.wrappers)
        model.register_forward_pre_hook(self._arm_recording)
        if self.ctx.recipe.model.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        self._set_recording()
        return model

    def _solve(self, key: str, c_t: torch.Tensor, c_p: torch.Tensor | None = None) -> tuple[Basis, float]:
        """The basis of one layer input, and the default init std of ``A~`` for it."""
        if c_p is None:
            c_p = self.ctx.calibration.cov_by_key("preserve", key).to(self.ctx.device)
        keep = resolve_keep(self.options.keep, c_p.shape[0])
        try:
            c_t = shrunk_task(c_t.to(self.ctx.device), self.options.task_shrinkage)
            basis = generalized_basis(c_t, c_p, self.options.damping, keep)
        except torch.linalg.LinAlgError as error:
            raise PPFTError(
                f"folora: C_p + eps I of input {key} (width {c_p.shape[0]}) is not positive definite in float64 at "
                f"method.damping {self.options.damping:g} ({error}). Raise method.damping (the spec's 1e-4; the lab "
                "uses 1e-3 to 1e-1) or calibrate on more preserve tokens."
            ) from None
        if self.options.step != "penalty":  # |a~_i v_i| ~ N(0, 1/(3K)): a row of A has PEFT's norm^2 1/3
            return basis, default_init_std(float(c_p.shape[0]), c_p.shape[0], keep)
        return basis, default_init_std(float(torch.trace(c_p)), c_p.shape[0], keep)

    def _step_scale(self, vectors: torch.Tensor, c_p: torch.Tensor | None = None) -> torch.Tensor:
        """Per column of ``V_K`` [n, K]: ``1 / |v_i|`` (``step: euclidean``), that times :meth:`_shrink`
        (``step: shrink``, which reads the input's ``C_p`` [n, n]), else ones; float32 [K]."""
        if self.options.step == "penalty":
            return torch.ones(vectors.shape[1], device=vectors.device)
        norms = vectors.double().norm(dim=0).clamp_min(1e-30)
        if self.options.step == "euclidean":
            return (1.0 / norms).float()
        return (self._shrink(vectors, norms, c_p) / norms).float()

    def _shrink(self, vectors: torch.Tensor, norms: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
        """``(1 + strength * u_i^T C_p u_i / mean eigenvalue of C_p)^(-1/2)`` with ``u_i = v_i / |v_i|``, float64 [K]:
        one Adam step's preserve output change along ``u_i`` is at most ``mean / strength`` (FORA's residual_shrink)."""
        c_p = c_p.to(vectors.device).double()
        units = vectors.double() / norms
        energy = ((c_p @ units) * units).sum(0).clamp_min(0)
        mean = float(torch.trace(c_p)) / c_p.shape[0]
        return (1 + self.options.shrink_strength * energy / max(mean, 1e-300)).rsqrt()

    def _wrap(self, linear: nn.Linear, basis: Basis, init_std: float, key: str) -> FoloraLinear:
        o = self.options
        wrapper = FoloraLinear(linear, basis.vectors, o.r, o.alpha, o.dropout, init_std)
        with torch.no_grad():
            wrapper.lora_A_tilde.mul_(self.step_scales[key].to(wrapper.lora_A_tilde.device))
            if o.init_gated:
                wrapper.lora_A_tilde.mul_(self._gate(key).to(wrapper.lora_A_tilde.device))
        return wrapper

    def init_rows(self) -> int:
        return self.options.init_rows if self.options.init == "gradient" else 0

    def init_from_data(self, model: nn.Module, batches) -> None:
        """``init: gradient``: each layer's ``A~`` along the task gradient its open columns can read
        (:meth:`FoloraLinear.align_a_tilde`; ``G`` from :func:`..gradient_init.task_gradients`)."""
        steps = {key: self._gate(key) * self.step_scales[key] for key in self.names_by_key}
        budget = stats_budget_bytes(self.ctx.recipe.calibration.stats_memory_gb, self.ctx.device)
        for name, grad in task_gradients(model, self.wrappers, batches, budget):
            self.wrappers[name].align_a_tilde(grad, steps[self.ctx.calibration.input_key(name)])
            del grad

    def build_optimizer(self, model: nn.Module, training) -> torch.optim.Optimizer:
        groups = self.parameter_groups(model, training.decay)
        optimizer = GatedAdamW(groups, lr=training.lr, betas=training.adam_betas, eps=training.adam_eps)
        self._set_gates(optimizer)
        return optimizer

    # -- gates ----------------------------------------------------------------------------------
    def _gate(self, key: str) -> torch.Tensor:
        """``g(lambda)`` of input ``key`` for the next update (float32 [K]); records ``gamma``."""
        o = self.options
        max_steps = self.ctx.recipe.training.max_steps
        q = quantile_at(self.step, max_steps, o.gamma_schedule, o.gamma_quantile_start, o.gamma_quantile)
        values = self.values[key]
        self.gammas[key] = gamma_of(values, q)
        hard_k = resolve_keep(o.hard_k, values.numel()) if o.hard_k is not None else None
        return gate_values(values, self.gammas[key], o.gate, o.temperature, hard_k)

    def _set_gates(self, optimizer) -> None:
        optimizer = unwrap_optimizer(optimizer)
        for key, names in self.names_by_key.items():
            gate = self._gate(key) * self.step_scales[key]
            for name in names:
                optimizer.set_gate(self.wrappers[name].lora_A_tilde, gate)

    # -- per step -------------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> None:
        """Adds this micro-batch's task inputs to the refresh window (no loss term)."""
        first = {key: self.wrappers[names[0]] for key, names in self.names_by_key.items()}
        inputs = {key: w.last_input for key, w in first.items() if w.last_input is not None}
        for w in self.wrappers.values():
            w.last_input, w.record_inputs = None, False  # no recording in backward recomputation
        if inputs:
            self.window.add_batch(inputs, batch)
        return None

    def after_step(self, model: nn.Module, optimizer, step: int) -> None:
        self.step = step
        every = self.options.refresh_every
        if every and step % every == 0 and step < self.ctx.recipe.training.max_steps:
            self.refresh(unwrap_optimizer(optimizer), model)
        self._set_gates(optimizer)
        self._set_recording()

    def _set_recording(self) -> None:
        self.window_open = in_window(self.step + 1, self.options.refresh_every, self.options.refresh_window)

    def _arm_recording(self, module: nn.Module, args) -> None:
        """Forward pre-hook of the whole model: each micro-batch's forward records its layer inputs once."""
        for w in self.wrappers.values():
            w.record_inputs = self.window_open

    # -- refresh --------------------------------------------------------------------------------
    def refresh(self, optimizer: GatedAdamW, model: nn.Module | None = None) -> None:
        """Re-estimate ``C_t`` from the window (and with ``refresh_preserve`` ``C_p`` on ``model`` as it is
        now), recompute ``V``/``lambda``, move ``A~`` and Adam moments."""
        start = time.perf_counter()
        task = {}
        for key, c_window in self.window.pop_estimates():
            previous = self.task_covs.get(key)
            if previous is None and self.options.refresh_mix < 1:
                previous = self.ctx.calibration.cov_by_key("task", key)
            c_t = mix_estimate(c_window, previous, self.options.refresh_mix)
            if self.options.refresh_mix < 1:
                self.task_covs[key] = c_t
            task[key] = c_t
        if self.options.refresh_preserve and model is not None:
            for key, c_p in self.current_preserve_covs(model):
                c_t = task.pop(key, None)
                if c_t is None:
                    c_t = self.task_covs.get(key)
                if c_t is None:  # read from disk only when neither the window nor a refresh has one
                    c_t = self.ctx.calibration.cov_by_key("task", key)
                self.rebase(key, c_t, optimizer, c_p)
        for key, c_t in task.items():
            self.rebase(key, c_t, optimizer)
        self.refresh_seconds.append(time.perf_counter() - start)

    def current_preserve_covs(self, model: nn.Module):
        """``(key, C_p [n, n])`` of every input, measured on ``model`` now (:func:`...calibration.stats.current_covs`:
        eval mode, no grad, one input at a time within ``calibration.stats_memory_gb``) over the first
        ``refresh_samples`` calibration preserve sequences, with the refresh window closed meanwhile."""
        recipe = self.ctx.recipe
        batches = refresh_batches(self.ctx.calibration, self.ctx.tokenizer, recipe.data.max_length,
                                  self.options.refresh_samples, recipe.calibration.stats_batch_size)  # fmt: skip
        budget = stats_budget_bytes(recipe.calibration.stats_memory_gb, self.ctx.device)
        names = [names[0] for names in self.names_by_key.values()]
        window_open, self.window_open = self.window_open, False
        try:
            for readers, c_p in current_covs(model, names, batches, self.ctx.device, budget):
                yield self.ctx.calibration.input_key(readers[0]), c_p
        finally:
            self.window_open = window_open
            for w in self.wrappers.values():
                w.last_input, w.record_inputs = None, False

    @torch.no_grad()
    def rebase(self, key: str, c_t: torch.Tensor, optimizer: GatedAdamW, c_p: torch.Tensor | None = None) -> None:
        """New coordinates for input ``key`` from ``c_t`` (and ``c_p``, else the calibration's): ``A~ <- A~ T``,
        moments likewise, ``V <- V_new``; ``T = V_old^T M_new V_new`` is exact for ``K = n``."""
        if c_p is None:
            c_p = self.ctx.calibration.cov_by_key("preserve", key).to(self.ctx.device)
        basis, _ = self._solve(key, c_t, c_p)
        names = self.names_by_key[key]
        t = transition(self.wrappers[names[0]].basis, basis.vectors, damped_preserve(c_p, self.options.damping))
        for name in names:
            w = self.wrappers[name]
            a_tilde = local(w.lora_A_tilde)  # [r, K] (this rank's rows under FSDP): T acts on columns
            a_tilde.copy_(a_tilde.double() @ t.to(a_tilde.device))
            optimizer.change_coordinates(w.lora_A_tilde, t)
            if w.basis.data_ptr() != self.wrappers[names[0]].basis.data_ptr() or name == names[0]:
                w.basis.copy_(basis.vectors)  # the layers of one input share one tensor: copied once
        self.values[key] = basis.values
        self.step_scales[key] = self._step_scale(basis.vectors, c_p)
        self.rebased.add(key)

    # -- the weight change (l2sp / ewc regularisers) --------------------------------------------
    def track_weight_deltas(self) -> None:
        return None  # dW = (alpha/r) B A~ V^T needs nothing kept

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": (alpha/r) B A~ V_K^T}`` with grad, float32 [m, n]."""
        return {f"{name}.weight": w.delta_weight() for name, w in self.wrappers.items()}

    def delta_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"<module>.weight": (A~ V_K^T [r, n], (alpha/r) B [m, r])}`` with grad."""
        return {f"{name}.weight": (w.lora_A(), w.scaling * w.lora_B) for name, w in self.wrappers.items()}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Step, ``lambda`` and ``gamma`` per input, the refresh state, and ``V_K`` only for inputs a refresh
        re-based: the calibration's bases are derived data, recomputed bit for bit at set-up on resume."""
        state = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for key, names in self.names_by_key.items():
            if key in self.rebased:
                state[f"basis/{key}"] = self.wrappers[names[0]].basis
            state[f"values/{key}"] = self.values[key]
            state[f"gamma/{key}"] = torch.tensor(self.gammas.get(key, float("nan")), dtype=torch.float64)
        state.update({f"task_cov/{k}": v for k, v in self.task_covs.items()})
        state.update(self.window.state_dict())
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        self.rebased = {key for key in self.names_by_key if f"basis/{key}" in state}
        for key, names in self.names_by_key.items():
            if key in self.rebased:
                for name in names:
                    self.wrappers[name].basis.copy_(state[f"basis/{key}"])
            self.values[key] = state[f"values/{key}"].to(self.ctx.device)
            shrink = self.options.step == "shrink"  # the only step that reads C_p
            c_p = self.ctx.calibration.cov_by_key("preserve", key) if shrink else None
            self.step_scales[key] = self._step_scale(self.wrappers[names[0]].basis, c_p)
            self.gammas[key] = float(state[f"gamma/{key}"])
        self.task_covs = {k.partition("/")[2]: v for k, v in state.items() if k.startswith("task_cov/")}
        self.window.load_state_dict({k: v for k, v in state.items() if k.startswith("window_")}, self.ctx.device)
        self._set_recording()

    # -- output ---------------------------------------------------------------------------------
    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A = A~ V_K^T [r, n], (alpha/r) B [m, r])}``: a scaling-1 LoRA with the same ``dW``."""
        with torch.no_grad():
            return {n: (w.lora_A(), w.scaling * w.lora_B) for n, w in self.wrappers.items()}

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        """A stock PEFT adapter in ``out_dir``; with ``merge`` also full weights ``W + dW`` in ``out_dir/merged``."""
        save_lora_factors_as_peft(out_dir, model, self.lora_factors(), tokenizer, self.base_ref)
        if merge:
            with plain_linears(model, self.wrappers, merge=True):
                model.save_pretrained(out_dir / "merged", safe_serialization=True)
            tokenizer.save_pretrained(out_dir / "merged")
