"""The one small interface every protection method implements.

The training engine calls, in order::

    method = MethodClass(options, ctx)
    model = method.prepare_model(model)              # freeze / wrap / re-initialise
    method.on_sharded(model)                         # under FSDP only, once the parameters are sharded
    dataset = method.training_data(dataset)          # e.g. replay mixes preserve samples in
    optimizer = method.build_optimizer(model, training_cfg)
    for each micro-batch:
        loss = model(**batch).loss + method.extra_loss(model, batch, outputs)  (if not None)
        ... backward, clip, optimizer.step() ...
        method.after_step(model, optimizer, step)    # once per optimizer update
    method.export(model, out_dir, tokenizer, merge)

Checkpoints store ``method.trainable_state(model)`` (the tensors that change), the optimizer state
and ``method.state_dict()`` (method-owned tensors such as a spectral basis), so resume is exact.

``needs`` declares which calibration artifacts the method reads; ``ppft train`` runs or reuses
``ppft calibrate`` when it is non-empty. ``calibrate_extra`` lets a method add its own cached
statistics (EWC's Fisher, KL's base log-probs) to the calibration output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from pydantic import Field, model_validator

from ..recipe_schema import StrictModel
from .regularizer_options import RegularizerConfig

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..recipe import Recipe

# Calibration artifacts a method may ask for.
PRESERVE_STATS = "preserve_stats"  # C_p per target layer input
TASK_STATS = "task_stats"  # C_t per target layer input
PRESERVE_DATA = "preserve_data"  # the preserve texts themselves (replay, kl, ewc)


class MethodOptions(StrictModel):
    """Base of every method's options. Subclasses set ``name: Literal["<method>"] = "<method>"``."""

    name: str
    regularizers: list[RegularizerConfig] = Field(
        default_factory=list,
        description="Functional regularisers on top of the method, each at most once: "
        "kl, replay, l2sp, ewc, leak (docs/methods/composition.md).",
    )

    @model_validator(mode="after")
    def _regularizers_unique(self) -> MethodOptions:
        names = [r.name for r in self.regularizers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"regularizers: {', '.join(repeated)} listed more than once; merge them into one entry")
        if self.name in names:
            raise ValueError(
                f"regularizers: method '{self.name}' already is the {self.name} regulariser on a form; "
                f"set its options on the method, or use method.name: full/lora with regularizers: [{{name: {self.name}}}]"
            )
        return self


@dataclass
class MethodContext:
    """What a method may read while it sets itself up.

    target_modules: full dotted names of the linear layers to adapt (resolved from the recipe).
    calibration: loaded calibration output, or None when the method needs none.
    """

    recipe: Recipe
    tokenizer: Any
    target_modules: list[str]
    device: torch.device
    calibration: Calibration | None = None
    is_main_process: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """Default behaviour: train every parameter that requires grad with AdamW, export with save_pretrained."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    needs: ClassVar[frozenset[str]] = frozenset()
    is_adapter: ClassVar[bool] = False  # True: export is a PEFT adapter, --merge gives full weights
    has_weight_deltas: ClassVar[bool] = False  # True: weight_deltas() works (the l2sp / ewc regularisers need it)

    def __init__(self, options: MethodOptions, ctx: MethodContext):
        self.options = options
        self.ctx = ctx

    @classmethod
    def needs_for(cls, options: MethodOptions) -> frozenset[str]:
        """What this configuration reads from calibration (default: ``needs``; options may drop some)."""
        return cls.needs

    # -- set-up ---------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def on_sharded(self, model: nn.Module) -> None:
        """After FSDP replaced ``model``'s parameters by row-sharded ones (before the optimizer is built):
        re-point kept parameter references and shard kept full-size copies like their parameter."""
        return None

    def training_data(self, dataset):
        """The data set the engine batches from (a ``datasets.Dataset`` of tokenized rows)."""
        return dataset

    def init_rows(self) -> int:
        """Training rows :meth:`init_from_data` reads at set-up (0: none, the default)."""
        return 0

    def init_from_data(self, model: nn.Module, batches) -> None:
        """Set initial parameters from the first ``init_rows()`` training rows (an iterable of collated batches
        on the device), after :meth:`prepare_model` and before sharding and the optimizer; not on resume."""
        return None

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def build_optimizer(self, model: nn.Module, training) -> torch.optim.Optimizer:
        groups = self.parameter_groups(model, training.decay)
        return torch.optim.AdamW(groups, lr=training.lr, betas=training.adam_betas, eps=training.adam_eps)

    # -- per step -------------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        return None

    # -- the weight change, for regularisers that read it (l2sp, ewc) ------------------------------
    def track_weight_deltas(self) -> None:
        """Called once after ``prepare_model``, before training: keep what :meth:`weight_deltas` needs
        (e.g. a copy of the pretrained weights). Methods with ``has_weight_deltas`` override it."""
        raise NotImplementedError(f"method {self.name} does not expose its weight change")

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{base parameter name: dW}`` with grad: the change of each base weight the method trains."""
        raise NotImplementedError(f"method {self.name} does not expose its weight change")

    def delta_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``{base parameter name: (A [q, n], B [m, q])}`` with grad and ``dW = B A``, for methods whose
        change is low rank (penalties then need no ``m x n`` product); None when it is not factored."""
        return None

    def delta_row_basis(self, name: str) -> torch.Tensor | None:
        """An orthonormal ``[n, c]`` basis that every row of ``dW`` of ``name`` (a :meth:`weight_deltas` key)
        stays in for the whole run, when the method guarantees one (FORA: ``Q``'s complement); else None.
        The same span for every layer that reads one input (callers may ask once per input)."""
        return None

    def delta_names(self) -> list[str]:
        """The keys of :meth:`weight_deltas`."""
        return list(self.weight_deltas())

    def weight_delta_sq_norm(self) -> torch.Tensor:
        """``sum ||dW||_F^2`` over :meth:`weight_deltas` (a scalar with grad)."""
        return sum((d.float() ** 2).sum() for d in self.weight_deltas().values())

    # -- calibration ----------------------------------------------------------------------------
    @classmethod
    def has_calibration_extra(cls, options: MethodOptions) -> bool:
        """Whether ``calibrate_extra`` adds anything for this configuration (default: when it is overridden)."""
        return getattr(cls.calibrate_extra, "__func__", None) is not Method.calibrate_extra.__func__

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe: Recipe) -> dict[str, torch.Tensor]:
        """Extra tensors to cache with the calibration output (default: none)."""
        return {}

    # -- state ----------------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise KeyError(f"checkpoint has parameters the model lacks: {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None

    # -- output ---------------------------------------------------------------------------------
    @property
    def base_ref(self) -> str:
        """The base model as exports record it (``base_model_name_or_path``): loadable by ``from_pretrained``."""
        from ..models import base_model_reference

        return base_model_reference(self.ctx.recipe.model.name_or_path)

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper; the model itself otherwise."""
    while hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model
