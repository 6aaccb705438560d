"""``fora``: function-space orthogonal residual adaptation (METHODS.md, "FORA").

Per target ``W`` [m, n]: ``dW = P_U M P_Q + U_c diag(delta) V_c^T`` with ``P_Q = I - Q Q^T`` (``Q``:
top eigenvectors of the preserve covariance ``C_p``) and ``P_U = I - U_1 U_1^T`` (``U_1``: top left
singular vectors of ``W``). ``form: full`` trains ``W`` with a projected AdamW (optim.py);
``form: lora`` sets ``M = (alpha/r) B A`` (layer.py) and exports a stock PEFT LoRA of rank ``r + s``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ...calibration.batches import refresh_batches
from ...calibration.stats import stats_budget_bytes
from ...errors import PPFTError
from ...progress import notice
from ...sharding import full, like
from ..adapter_export import save_lora_factors_as_peft
from ..base import PRESERVE_STATS, Method, MethodOptions
from .bases import RightProjector, compute_bases, input_projector, orthonormal_complement
from ..gradient_init import init_rows_field, task_gradients
from .layer import ForaLinear
from .optim import LOW_PRECISION, ProjectedAdamW
from .refresh import current_projectors

BASES = ("right", "u1", "u_c", "v_c")
BASES_HASH = "bases_sha256"


class ForaOptions(MethodOptions):
    name: Literal["fora"] = "fora"
    form: Literal["full", "lora"] = Field(
        "lora", description="lora: M = (alpha/r) B A, exported as a PEFT adapter; full: projected AdamW on W itself."
    )
    r: int = Field(8, gt=0, description="LoRA rank (form: lora).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: M = (alpha / r) B A (form: lora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input (form: lora).")
    init: Literal["kaiming", "complement", "gradient"] = Field(
        "kaiming",
        description="form: lora, A's initial rows: PEFT's Kaiming-uniform (kaiming); those rows projected onto "
        "the complement of Q and rescaled to their Kaiming norm (complement, ours); or the top right singular "
        "vectors of the task gradient FORA lets A read, G P, over the first init_rows training rows, at "
        "Kaiming's row norm (gradient, ours; B stays 0, so the model starts as the base).",
    )
    init_rows: int = init_rows_field("A")
    source: Literal["activation", "weight"] = Field(
        "activation",
        description="Q from the top eigenvectors of C_p (activation) or the top right singular vectors of W (weight).",
    )
    energy: float = Field(
        0.99, ge=0, le=1,
        description="Q: the fewest leading directions holding this fraction of the eigenvalue sum. The spec: 0.95; "
        "0.99 by the lab's evidence (docs/methods/ablations.md).",
    )  # fmt: skip
    rank: int | None = Field(None, ge=0, description="Explicit size k of Q; overrides energy and max_rank.")
    max_rank: float = Field(
        0.9, gt=0, description="Cap on k: a fraction of n if < 1, else a count. Ours: 0.9 (was 0.5; see ablations.md)."
    )
    u_energy: float = Field(
        0.0, ge=0, le=1,
        description="U_1: the fewest top left singular vectors holding this fraction of sum(S^2). The spec's "
        "interpretation: 0.5; 0 (no output projector) by the lab's evidence.",
    )
    u_rank: int | None = Field(None, ge=0, description="Explicit r_u; overrides u_energy/u_max_rank. 0 disables P_U.")
    u_max_rank: float = Field(0.25, gt=0, description="Cap on r_u: a fraction of m if < 1, else a count. Ours: 0.25.")
    spectral_size: int = Field(
        0, ge=0,
        description="s: trainable singular-value shifts delta on s triplets of W (0 disables the channel). "
        "The spec's interpretation: 8; 0 by the lab's evidence.",
    )
    spectral_which: Literal["top", "tail"] = Field("top", description="Which triplets carry the channel: top or tail.")
    solver_dtype: Literal["float64", "float32"] = Field(
        "float64",
        description="dtype of the eigensolver for Q (float32: half the set-up transient memory and time; measured "
        "at the Qwen3-1.7B width: same k, captured energy equal to 1e-6).",
    )
    residual_shrink: float = Field(
        0.0, ge=0, le=1e12,
        description="Ours (0: off, the spec): shrink how far A can read each unprotected eigendirection v_i of C_p "
        "to (1 + residual_shrink * lambda_i / mean lambda)^(-1/2) of its length, so one step's preserve output "
        "change along any direction is at most mean lambda / residual_shrink (bases.residual_shrink).",
    )  # fmt: skip
    refresh_every: int = Field(
        0, ge=0, le=10**9,
        description="form: full: re-estimate C_p on the current model and recompute Q every this many steps "
        "(0: never, the spec; ours).",
    )  # fmt: skip
    refresh_samples: int = Field(
        64, gt=0, le=10**7, description="Calibration preserve sequences each refresh runs through the model."
    )

    export_adapter: bool = Field(
        False,
        description="form: full: export the update as a stock PEFT LoRA adapter instead of merged weights (ours). "
        "Exact: dW Q = 0 makes dW = (dW Q_c) Q_c^T, rank n - k per input (with output.merge, merged weights too).",
    )

    export_rank: int | None = Field(
        None,
        ge=1,
        description="with export_adapter: keep each layer's top export_rank singular directions of W - W_0 (ours). "
        "None: exact, rank n - k. The kept right singular vectors lie in span(Q_c), so the truncated update still "
        "reads nothing of Q; the relative error per layer goes to export_truncation.json.",
    )

    @model_validator(mode="after")
    def _adapter_export_needs_a_fixed_q(self):
        if self.export_adapter and (self.form != "full" or self.refresh_every):
            raise ValueError("export_adapter is for form: full with a fixed Q (refresh_every: 0); the LoRA form "
                             "always exports an adapter")  # fmt: skip
        if self.export_rank is not None and not self.export_adapter:
            raise ValueError("export_rank truncates the adapter that export_adapter: true writes; set export_adapter: "
                             "true (form: full) or remove export_rank")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _init_is_for_the_lora_form(self):
        if self.init != "kaiming" and self.form != "lora":
            raise ValueError(f"init: {self.init} sets the LoRA form's A; form: full has none (remove init)")
        return self

    @model_validator(mode="after")
    def _refresh_needs_full_form(self):
        if self.residual_shrink and (self.source != "activation" or self.refresh_every):
            raise ValueError("residual_shrink reads the eigenvalues of C_p: it needs source: activation and a fixed Q "
                             "(refresh_every: 0)")  # fmt: skip
        if self.refresh_every and (self.form != "full" or self.source != "activation"):
            raise ValueError("refresh_every re-estimates Q from activations for form: full, source: activation only "
                             "(in the LoRA form A' would jump with Q); set those or refresh_every: 0")
        return self


class Fora(Method):
    name = "fora"
    Options = ForaOptions
    needs = frozenset({PRESERVE_STATS})
    is_adapter = True  # form: lora (the default); instances with form: full say False
    has_weight_deltas = True

    def __init__(self, options: ForaOptions, ctx):
        super().__init__(options, ctx)
        self.is_adapter = options.form == "lora" or options.export_adapter
        self.w0_complement: dict[str, torch.Tensor] = {}  # export_adapter: W_0 Q_c [m, n - k], float32, CPU
        self.layers: dict[str, ForaLinear] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.w0: dict[str, torch.Tensor] = {}  # full form, when a regulariser reads weight_deltas
        self.optimizer: ProjectedAdamW | None = None
        self.refreshed: dict[str, RightProjector] = {}  # input key -> P_Q from the last refresh

    @classmethod
    def needs_for(cls, options: ForaOptions) -> frozenset[str]:
        return cls.needs if options.source == "activation" else frozenset()

    # -- set-up ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze the model, wrap every target linear; in the full form ``W`` (not its bias) trains."""
        model.requires_grad_(False)
        lora = self.options.form == "lora"
        keep_anchor = not lora and self.ctx.recipe.training.decay > 0
        shared: dict[str, RightProjector] = {}
        for name in self.ctx.target_modules:
            linear = model.get_submodule(name)
            bases = compute_bases(linear.weight, self._input_projector(name, shared), self.options)
            layer = ForaLinear(
                linear, bases, self.options.r if lora else 0, self.options.alpha, self.options.dropout, self.options.init
            )
            _replace_module(model, name, layer)
            self.layers[name] = layer
            if not lora:
                linear.weight.requires_grad_(True)
            if keep_anchor:
                self.anchors[name] = linear.weight.detach().clone()
        if self.options.export_adapter:
            complements = ComplementCache()
            for name, layer in self.layers.items():
                self.w0_complement[name] = (layer.base.weight.detach().float() @ complements.of(layer)).cpu()
        return model

    def init_rows(self) -> int:
        return self.options.init_rows if self.options.init == "gradient" else 0

    def init_from_data(self, model: nn.Module, batches) -> None:
        """``init: gradient``: each layer's A along its readable task gradient (:mod:`..gradient_init`), the
        layers' ``G`` in groups within ``calibration.stats_memory_gb``."""
        budget = stats_budget_bytes(self.ctx.recipe.calibration.stats_memory_gb, self.ctx.device)
        for name, grad in task_gradients(model, self.layers, batches, budget):
            self.layers[name].align_a(grad)
            del grad

    def on_sharded(self, model: nn.Module) -> None:
        """FSDP: the decay anchors ``W_0`` are split by rows like their (now sharded) weights."""
        self.anchors = {n: like(w0, self.layers[n].base.weight) for n, w0 in self.anchors.items()}

    def _input_projector(self, name: str, shared: dict[str, RightProjector]) -> RightProjector | None:
        """``P_Q`` of the layer's input from its ``C_p``, made once per distinct input and shared by the
        layers reading it (None for ``source: weight``). Only its float32 basis outlives the call."""
        if self.options.source == "weight":
            return None
        calibration = self.ctx.calibration
        if calibration is None:
            raise PPFTError("fora with source: activation needs calibration statistics (C_p); weightproj needs none")
        key = calibration.input_key(name)
        if key not in shared:
            dtype = torch.float64 if self.options.solver_dtype == "float64" else torch.float32
            upper = calibration.upper_triangle("preserve", key, dtype, self.ctx.device)
            shared[key] = input_projector(upper, self.options)
        return shared[key]

    def build_optimizer(self, model: nn.Module, training) -> torch.optim.Optimizer:
        if self.options.form == "lora":
            return super().build_optimizer(model, training)
        params = [p for p in model.parameters() if p.requires_grad]
        projectors = {layer.base.weight: (layer.projector, layer.u1) for layer in self.layers.values()}
        anchors = {self.layers[n].base.weight: w0 for n, w0 in self.anchors.items()}
        low = sorted({str(w.dtype).removeprefix("torch.") for w in projectors if w.dtype in LOW_PRECISION})
        if low:
            notice(
                f"fora form: full on {'/'.join(low)} weights: the optimizer keeps a float32 master copy and float32 "
                "moments of every target weight (12 bytes per weight); dW Q = 0 holds for the master, the stored "
                "weights are one rounding away from it. For the exact guarantee set model.dtype: float32 (with "
                "training.mixed_precision: bf16 on a GPU)."
            )
        self.optimizer = ProjectedAdamW(
            params, lr=training.lr, betas=training.adam_betas, eps=training.adam_eps,
            weight_decay=training.decay, projectors=projectors, anchors=anchors,
        )  # fmt: skip
        return self.optimizer

    # -- refreshing Q (form: full, refresh_every > 0; refresh.py) ---------------------------
    def after_step(self, model: nn.Module, optimizer, step: int) -> None:
        every = self.options.refresh_every
        if every and step % every == 0 and step < self.ctx.recipe.training.max_steps:
            self.refresh_q(model)

    def refresh_q(self, model: nn.Module) -> None:
        """``P_Q`` of every input from ``C_p`` of the current model's preserve activations."""
        self.bases_digest()  # the calibration bases' hash, taken before they change
        recipe = self.ctx.recipe
        batches = refresh_batches(self.ctx.calibration, self.ctx.tokenizer, recipe.data.max_length,
                                  self.options.refresh_samples, recipe.calibration.stats_batch_size)  # fmt: skip
        budget = stats_budget_bytes(recipe.calibration.stats_memory_gb, self.ctx.device)
        projectors = current_projectors(model, list(self.layers), batches, self.options, self.ctx.device, budget)
        for name, projector in projectors.items():
            self.refreshed[self.ctx.calibration.input_key(name)] = projector
        self._apply_refreshed()

    def _apply_refreshed(self) -> None:
        """Every layer (and the projected AdamW) reads its input's refreshed ``P_Q``."""
        if not self.refreshed:
            return
        for name, layer in self.layers.items():
            projector = self.refreshed.get(self.ctx.calibration.input_key(name))
            if projector is not None:
                layer.right, layer.q_complement = projector.vectors, projector.complement
                if self.optimizer is not None:
                    self.optimizer.set_projector(layer.base.weight, layer.projector, layer.u1)

    # -- the weight change (l2sp / ewc regularisers) --------------------------------------------
    def track_weight_deltas(self) -> None:
        """Full form: keep ``W_0`` of every layer (the weight-decay anchor when there is one)."""
        if self.options.form == "full" and not self.w0:
            self.w0 = {n: self.anchors[n] if n in self.anchors else l.base.weight.detach().clone() for n, l in self.layers.items()}

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": dW}`` with grad: ``(W - W_0) + U_c diag(delta) V_c^T`` (full form) or
        ``(alpha/r) B' A' + U_c diag(delta) V_c^T`` (LoRA form), float32 [m, n]."""
        deltas = {}
        for name, layer in self.layers.items():
            delta = layer.added_weight()
            if self.options.form == "full":
                delta = delta + (layer.base.weight - self.w0[name]).float()
            deltas[f"{name}.weight"] = delta
        return deltas

    def delta_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """LoRA form: ``{"<module>.weight": ([A'; V_c^T], [(alpha/r) B' | U_c diag(delta)])}`` with grad;
        full form: None (its change is not low rank)."""
        if self.options.form == "full":
            return None
        return {f"{name}.weight": layer.factors() for name, layer in self.layers.items()}

    def delta_row_basis(self, name: str) -> torch.Tensor | None:
        """``Q_c`` [n, n - k] of the layer's input (``dW Q = 0``); None with a spectral channel (it writes
        along ``V_c``) or with ``refresh_every`` (``Q`` moves during the run)."""
        if self.options.spectral_size or self.options.refresh_every:
            return None
        return complement_basis(self.layers[name.removesuffix(".weight")])

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the sha256 of every layer's bases: they are derived data, recomputed from the calibration
        (deterministically, bit for bit) when training resumes, and checked against this hash."""
        state = {BASES_HASH: torch.frombuffer(bytearray(self.bases_digest()), dtype=torch.uint8)}
        for key, projector in self.refreshed.items():  # refreshed bases are state, not derived data
            state[f"refreshed/{key}"] = projector.vectors
            state[f"refreshed_complement/{key}"] = torch.tensor(projector.complement)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if BASES_HASH not in state:
            raise PPFTError("this FORA checkpoint has no bases hash (made by an older ppft); resume is not possible")
        if bytes(state[BASES_HASH].tolist()) != self.bases_digest():
            raise PPFTError(
                "FORA's bases recomputed from the calibration differ from those the checkpoint was trained with "
                "(the calibration, the method options or the numerics changed). Restore that calibration, or "
                "start the run afresh (without --resume)."
            )
        prefix = "refreshed/"
        self.refreshed = {
            k[len(prefix):]: RightProjector(v.to(self.ctx.device), bool(state[f"refreshed_complement/{k[len(prefix):]}"]))
            for k, v in state.items() if k.startswith(prefix)
        }  # fmt: skip
        self._apply_refreshed()

    def bases_digest(self) -> bytes:
        """sha256 over every layer's bases in target order (each distinct tensor once, with its shape)."""
        if getattr(self, "_digest", None) is None:
            digest, seen = hashlib.sha256(), set()
            for name, layer in self.layers.items():
                for key in BASES + (("shrink_vectors", "shrink") if layer.shrink.numel() else ()):
                    tensor = getattr(layer, key)
                    digest.update(f"{name}.{key}:{tuple(tensor.shape)}:{layer.q_complement}".encode())
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._digest = digest.digest()
        return self._digest

    # -- output ---------------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        """LoRA form: a stock PEFT adapter of rank ``r + s`` (merged weights in ``out_dir/merged`` too with ``merge``).
        Full form: the merged model (channel folded into ``W``) with ``save_pretrained``; with ``export_adapter``
        a stock PEFT adapter of ``W - W_0`` (:meth:`full_form_factors`), merged weights too with ``merge``."""
        if self.options.form == "full" and not self.options.export_adapter:
            save_merged(model, self.layers, out_dir, tokenizer)
            return
        if self.options.form == "full":
            factors = self.full_form_factors()
            if self.options.export_rank is not None:
                factors, errors = truncate_factors(factors, self.options.export_rank, self.options.spectral_size)
            save_lora_factors_as_peft(out_dir, model, factors, tokenizer, self.base_ref)
            if self.options.export_rank is not None:
                write_truncation_report(out_dir, self.options.export_rank, errors)
            if merge:
                save_merged(model, self.layers, out_dir / "merged", tokenizer)
            return
        factors = {name: layer.update_factors() for name, layer in self.layers.items()}
        save_lora_factors_as_peft(out_dir, model, factors, tokenizer, self.base_ref)
        if merge:
            save_merged(model, self.layers, out_dir / "merged", tokenizer)

    def full_form_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Full form: ``{module: (A, B)}`` with ``B A = W - W_0`` (+ the channel), float32 on the CPU.

        ``W - W_0`` only ever moved through ``P_Q``, so ``(W - W_0) Q = 0`` and ``W - W_0 = (W - W_0) Q_c Q_c^T``
        with ``Q_c`` [n, n - k] the orthonormal complement: ``A = Q_c^T``, ``B = W Q_c - W_0 Q_c``. The
        channel's factors (``V_c^T``, ``U_c diag(delta)``) are appended when ``spectral_size > 0``."""
        factors, complements = {}, ComplementCache()
        for name, layer in self.layers.items():
            q_c = complements.of(layer)
            weight = full(layer.base.weight).detach().float()
            a, b = q_c.T.cpu(), (weight @ q_c).cpu() - self.w0_complement[name]
            channel = layer.update_factors()
            if channel is not None:
                a, b = torch.cat([a, channel[0].cpu()], 0), torch.cat([b, channel[1].cpu()], 1)
            factors[name] = (a, b)
        return factors


def truncate_factors(factors: dict, rank: int, channel: int) -> tuple[dict, dict[str, float]]:
    """Each ``(A, B)`` of :meth:`Fora.full_form_factors` cut to the top ``rank`` singular directions of
    its projected part ``B_p A_p`` (the channel's last ``channel`` rows/columns stay whole).

    ``A_p = Q_c^T`` has orthonormal rows, so with ``B_p = U S V^T`` (float64) the update is
    ``U S (Q_c V)^T`` and its best rank-``rank`` approximation is ``A = (Q_c V_r)^T``, ``B = U_r S_r``:
    the kept directions stay in ``span(Q_c)`` (``A Q = 0``). Returns the factors and, per layer, the
    relative Frobenius error ``sqrt(sum_{i > rank} s_i^2 / sum_i s_i^2)`` (0 when nothing is cut).
    """
    out, errors = {}, {}
    for name, (a, b) in factors.items():
        width = a.shape[0] - channel
        a_p, b_p = a[:width].double(), b[:, :width].double()
        if width <= rank:
            out[name], errors[name] = (a, b), 0.0
            continue
        u, sv, vh = torch.linalg.svd(b_p, full_matrices=False)
        total = float((sv**2).sum())
        errors[name] = (float((sv[rank:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        a_r, b_r = (vh[:rank] @ a_p).float(), (u[:, :rank] * sv[:rank]).float()
        out[name] = (torch.cat([a_r, a[width:]], 0), torch.cat([b_r, b[:, width:]], 1))
    return out, errors


def write_truncation_report(out_dir: Path, rank: int, errors: dict[str, float]) -> None:
    """``export_truncation.json`` beside the adapter: the rank and each layer's relative error."""
    values = list(errors.values())
    report = {"export_rank": rank, "max_relative_error": max(values), "mean_relative_error": sum(values) / len(values),
              "relative_error": errors}  # fmt: skip
    (Path(out_dir) / "export_truncation.json").write_text(json.dumps(report, indent=2) + "\n")


def complement_basis(layer: ForaLinear) -> torch.Tensor:
    """``Q_c`` [n, n - k] (float32, orthonormal complement of the layer's ``Q``; the kept basis itself when
    that is the complement). With ``k = n`` (nothing free) one zero column, so the update ``0`` still
    exports as a rank-1 adapter."""
    projector = layer.projector
    q_c = projector.vectors if projector.complement else orthonormal_complement(projector.vectors)
    return q_c if q_c.shape[1] else q_c.new_zeros(q_c.shape[0], 1)


class ComplementCache:
    """:func:`complement_basis` once per distinct input basis (layers reading one input share it)."""

    def __init__(self):
        self.by_basis: dict[int, torch.Tensor] = {}

    def of(self, layer: ForaLinear) -> torch.Tensor:
        key = id(layer.right)
        if key not in self.by_basis:
            self.by_basis[key] = complement_basis(layer)
        return self.by_basis[key]


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_merged(model: nn.Module, layers: dict[str, ForaLinear], out_dir: Path, tokenizer) -> None:
    """Save the model with every ``ForaLinear`` replaced by its base linear holding ``W + dW`` (on CPU).

    The model is restored afterwards (same parameter objects), so training state stays valid.
    """
    originals = {}
    try:
        for name, layer in layers.items():
            originals[name] = layer.base.weight
            layer.base.weight = nn.Parameter(layer.merged_weight().cpu(), requires_grad=False)
            _replace_module(model, name, layer.base)
        model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    finally:
        for name, weight in originals.items():
            layers[name].base.weight = weight
            _replace_module(model, name, layers[name])
