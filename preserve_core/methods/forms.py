"""The trainable parametrisation of ``full``, ``lora`` and the baselines ``replay``, ``l2sp``, ``ewc``, ``kl``.

``form: full`` trains the target linears themselves, exactly as :mod:`.full`; ``form: lora`` trains a
PEFT LoRA on them, exactly as :mod:`.lora`. Either way a regulariser sees the same thing: the
change of each trained base parameter ``dtheta = theta - theta_0``. For LoRA that is the weight
update ``dW = s B A`` (``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; ``A [r, n]``,
``B [m, r]``), i.e. the regulariser acts on the effective weight ``W_0 + dW`` and ``theta_0 = W_0``
(``dW = 0`` at init because ``B = 0``).

A baseline is a form plus one regulariser (:class:`FormWithRegularizer`): ``kl`` is ``full`` (or
``lora``) with the ``kl`` regulariser built from the method's own options, and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from peft import LoraConfig, get_peft_model
from pydantic import Field
from torch import nn

from ..sharding import differentiable_local, full, like, local, sum_over_shards
from .base import Method, MethodOptions

ADAPTER = "default"


def unfreeze_targets(model: nn.Module, target_modules: list[str], train_embeddings: bool) -> None:
    """Freeze everything, then let the target linears (weight and bias) train; optionally embeddings too."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in target_modules:
        modules[name].requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().requires_grad_(True)


def lora_config(options, target_modules: list[str], **extra) -> LoraConfig:
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        use_rslora=options.use_rslora,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def export_peft(model: nn.Module, out_dir: Path, tokenizer, merge: bool, base_ref: str) -> None:
    """Save a PEFT model as a stock adapter in ``out_dir``; with ``merge`` also full weights in ``out_dir/merged``.

    ``base_ref`` is recorded as the adapter's ``base_model_name_or_path`` (what
    ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads the base from).
    """
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_ref
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "merged")


class FormOptions(MethodOptions):
    """Fields shared by the regulariser baselines: which parametrisation trains."""

    form: Literal["full", "lora"] = Field("full", description="full: train the target linears; lora: a PEFT LoRA on them.")
    r: int = Field(8, gt=0, description="LoRA rank (form: lora).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: dW = (alpha / r) B A (form: lora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (form: lora).")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead (form: lora).")


class FormMethod(Method):
    """A method that trains per ``form`` and offers :meth:`weight_deltas` to its regularisers.

    ``form`` is ``options.form`` where the options have one, else ``default_form`` (``full``: full,
    ``lora``: lora). ``is_adapter`` is per instance: ``form == "lora"`` (the pattern ``fora`` uses too).
    """

    is_adapter = False
    has_weight_deltas = True
    default_form: ClassVar[str] = "full"

    def __init__(self, options: MethodOptions, ctx):
        super().__init__(options, ctx)
        self.form = getattr(options, "form", self.default_form)
        self.is_adapter = self.form == "lora"
        self.theta0: dict[str, torch.Tensor] = {}
        self.row_sharded_deltas = False  # FSDP with form: full: weight_deltas() are this rank's rows

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.form == "lora":
            model = get_peft_model(model, lora_config(self.options, self.ctx.target_modules))
            inner = model.base_model.model
            self.lora_layers = {name: inner.get_submodule(name) for name in self.ctx.target_modules}
            return model
        unfreeze_targets(model, self.ctx.target_modules, self.ctx.recipe.model.train_embeddings)
        self.trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.keeps_theta0():
            self.track_weight_deltas()
        return model

    def on_sharded(self, model: nn.Module) -> None:
        """``form: full``: the trained parameters are now row-sharded; ``theta_0`` is split the same way."""
        if self.form == "full":
            self.row_sharded_deltas = True
            self.trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
            self.theta0 = {n: like(t0, self.trained[n]) for n, t0 in self.theta0.items()}

    def keeps_theta0(self) -> bool:
        """Whether ``form: full`` keeps a copy of the pretrained trained weights (one extra copy in memory)."""
        return True

    def track_weight_deltas(self) -> None:
        if self.form == "full" and not self.theta0:
            self.theta0 = {n: p.detach().clone() for n, p in self.trained.items()}

    def delta_names(self) -> list[str]:
        if self.form == "lora":
            return [f"{name}.weight" for name in self.lora_layers]
        return list(self.trained)

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{base parameter name: theta - theta_0}`` with grad; for LoRA ``{"<module>.weight": s B A}``.

        Under FSDP (``row_sharded_deltas``): ``form: full`` gives this rank's rows of each delta (sum a
        penalty over them with :func:`~preserve_core.sharding.sum_over_shards`); ``form: lora`` the whole
        ``s B A`` on every rank.
        """
        if self.form == "lora":
            return {f"{name}.weight": lora_delta(layer) for name, layer in self.lora_layers.items()}
        return {n: differentiable_local(p) - local(self.theta0[n]) for n, p in self.trained.items()}

    def delta_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """LoRA: ``{"<module>.weight": (A, s B)}``; full fine-tuning: None."""
        if self.form != "lora":
            return None
        factors = {}
        for name, layer in self.lora_layers.items():
            a, b, s = lora_factors(layer)
            factors[f"{name}.weight"] = (full(a), s * full(b))
        return factors

    def weight_delta_sq_norm(self) -> torch.Tensor:
        if self.form == "lora":
            return sum(lora_delta_sq_norm(layer) for layer in self.lora_layers.values())
        return sum_over_shards(super().weight_delta_sq_norm(), self.row_sharded_deltas)

    def export(self, model: nn.Module, out_dir: Path, tokenizer, merge: bool) -> None:
        if self.form == "lora":
            export_peft(model, out_dir, tokenizer, merge, self.base_ref)
        else:
            super().export(model, out_dir, tokenizer, merge)


class FormWithRegularizer(FormMethod):
    """A baseline: a form plus one regulariser (``Regularizer``) built from the method's own options."""

    Regularizer: ClassVar[type]

    def __init__(self, options: FormOptions, ctx):
        super().__init__(options, ctx)
        self.regularizer = self.Regularizer(self.regularizer_options(options), ctx)

    @classmethod
    def regularizer_options(cls, options: FormOptions):
        fields = set(cls.Regularizer.Options.model_fields) - {"name"}
        return cls.Regularizer.Options(**{k: getattr(options, k) for k in fields})

    @classmethod
    def needs_for(cls, options: FormOptions) -> frozenset[str]:
        return cls.Regularizer.needs_for(cls.regularizer_options(options))

    @classmethod
    def has_calibration_extra(cls, options: FormOptions) -> bool:
        return cls.Regularizer.has_calibration_extra(cls.regularizer_options(options))

    @classmethod
    def calibrate_extra(cls, model: nn.Module, tokenizer, preserve_texts: list[str], recipe) -> dict[str, torch.Tensor]:
        own = recipe.method.name == cls.name
        options = cls.regularizer_options(recipe.method) if own else cls.Regularizer.Options()
        return cls.Regularizer.calibrate_extra(model, tokenizer, preserve_texts, recipe, options)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        self.regularizer.attach(model, self)
        return model

    def on_sharded(self, model: nn.Module) -> None:
        super().on_sharded(model)
        self.regularizer.on_sharded(model, self)

    def training_data(self, dataset):
        return self.regularizer.training_data(dataset)

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return self.regularizer.extra_loss(model, batch, outputs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.regularizer.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.regularizer.load_state_dict(state)


def lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, n], B [m, r], s)`` of a PEFT LoRA layer's default adapter."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER])


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """``dW = s B A``, shape ``[m, n]``."""
    a, b, s = lora_factors(layer)
    return s * (full(b) @ full(a))


def lora_delta_sq_norm(layer: nn.Module) -> torch.Tensor:
    """``||s B A||_F^2 = s^2 tr((B^T B)(A A^T))``: two ``r x r`` Gram matrices, no ``m x n`` product."""
    a, b, s = lora_factors(layer)
    a, b = full(a), full(b)  # under FSDP: gathered, with autograd back to each rank's rows
    return s * s * ((b.T @ b) * (a @ a.T)).sum()
