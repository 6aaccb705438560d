"""FSDP: parameters, gradients and optimizer state sharded over processes (torch ``fully_shard``, FSDP2).

Each decoder layer (``model._no_split_modules``) and then the whole model become one ``fully_shard``
unit; every parameter is a ``DTensor`` split by rows (``Shard(0)``: rank ``i`` holds rows
``[i*ceil(m/P), (i+1)*ceil(m/P))`` of an ``[m, ...]`` tensor). A forward all-gathers a unit's
weights, a backward reduce-scatters its gradients (mean over ranks, like DDP). Optimizers run on
each rank's local rows (:func:`local`); whatever couples rows (FORA's left projection ``U_1^T X``)
is reduced across ranks by the optimizer itself.

Checkpoints and exports are written from full tensors gathered on rank 0 (:func:`full_parameters`,
:func:`full_optimizer_state`), so they are the same files a single-process run writes and resume works
with any number of processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .errors import RecipeError

# accelerate's FSDP variable -> (values ppft refuses, what to do instead)
REFUSED_ENV = {
    "FSDP_OFFLOAD_PARAMS": (("true",), "set fsdp_offload_params: false"),
    "FSDP_ACTIVATION_CHECKPOINTING": (("true",), "set it to false and use model.gradient_checkpointing: true in the recipe"),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": (("true",), "set fsdp_cpu_ram_efficient_loading: false"),
    "FSDP_AUTO_WRAP_POLICY": (("size_based_wrap", "no_wrap"), "ppft wraps each decoder layer: use TRANSFORMER_BASED_WRAP"),
}


@dataclass(frozen=True)
class FsdpSettings:
    """How to shard. ``source`` says where the request came from (for error messages)."""

    reshard_after_forward: bool = True
    source: str = "training.distributed.strategy: fsdp"


def fsdp_settings(recipe) -> FsdpSettings | None:
    """FSDP settings from the recipe or from ``accelerate launch --config_file <fsdp config>``; None: DDP.

    ``accelerate launch`` passes its FSDP config as ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` variables;
    ppft honours ``fsdp_version`` (must be 2) and ``fsdp_reshard_after_forward``, always wraps each
    decoder layer (``TRANSFORMER_BASED_WRAP``) and writes full-tensor checkpoints, and refuses the
    settings it would otherwise ignore (:data:`REFUSED_ENV`).
    """
    strategy = recipe.training.distributed.strategy
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if strategy == "ddp" and from_launcher:
        raise RecipeError(
            "training.distributed.strategy is ddp but `accelerate launch` was given an FSDP config; "
            "set strategy: fsdp (or auto), or launch without the FSDP config"
        )
    if strategy == "fsdp":
        return FsdpSettings(recipe.training.distributed.reshard_after_forward)
    if not from_launcher:
        return None
    source = "the accelerate config (fsdp_*)"
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise RecipeError(f"{source}: ppft shards with FSDP2; set fsdp_version: 2 in the accelerate config file")
    for variable, (bad, fix) in REFUSED_ENV.items():
        if os.environ.get(variable, "").lower() in bad:
            raise RecipeError(f"{source}: {variable.lower()}={os.environ[variable]} is not supported by ppft; {fix}")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")
    return FsdpSettings(reshard, source)


def check_fsdp_recipe(recipe, settings: FsdpSettings) -> None:
    """Refuse (exit 2) method/option combinations that do not run sharded yet."""
    method = recipe.method
    why = None
    if getattr(method, "regularizers", None):
        why = "method.regularizers is not supported sharded yet (the baselines l2sp, ewc, kl, replay are)"
    if method.name in ("fora", "weightproj") and getattr(method, "refresh_every", 0):
        why = "refresh_every (re-estimating Q during training) is untested sharded; set it to 0"
    if method.name == "kl" and method.reference == "frozen" and method.form == "full":
        why = "reference: frozen with form: full evaluates the base weights through functional_call; use reference: cached"
    if recipe.eval.every_n_steps and recipe.eval.preserve:
        why = "eval.every_n_steps > 0 (retention during training) is not supported sharded; set it to 0 and run ppft eval after"
    if recipe.training.mixed_precision == "fp16":
        why = "training.mixed_precision: fp16 (loss scaling) is not supported sharded; use bf16"
    if why:
        raise RecipeError(f"{settings.source} with method {method.name}: {why}")


# ---------------------------------------------------------------------------------------------
# Sharding the model
# ---------------------------------------------------------------------------------------------
def shard_model(model: nn.Module, device: torch.device, settings: FsdpSettings, mixed_precision: str) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, head) over all ranks.

    Under ``mixed_precision: bf16``, or with weights loaded in bf16/fp16, the trainable parameters are
    upcast to float32 master weights (FSDP needs one dtype among a unit's trainable parameters, and
    FORA's ``dW Q = 0`` does not survive bf16 rounding of ``W``: docs/results.md); FSDP gathers every
    parameter in the compute dtype (bf16 or the load dtype) and reduces gradients in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    compute = compute_dtype(model, mixed_precision)
    if compute is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": settings.reshard_after_forward}
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise RecipeError(
            f"{settings.source}: found no decoder layers to shard in {type(model).__name__} "
            "(its _no_split_modules is empty); use DDP for this model"
        )
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def compute_dtype(model: nn.Module, mixed_precision: str) -> torch.dtype | None:
    """bf16 under ``mixed_precision: bf16``; else the low-precision dtype the weights were loaded in; None: float32."""
    if mixed_precision == "bf16":
        return torch.bfloat16
    low = [p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16)]
    return max(set(low), key=low.count) if low else None


# ---------------------------------------------------------------------------------------------
# Local shards, full tensors
# ---------------------------------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (a view: in-place changes reach the ``DTensor``); ``t`` otherwise."""
    return t._local_tensor if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather when sharded: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor every rank holds) sharded the way ``ref`` is; ``t`` when ``ref`` is not sharded."""
    if not isinstance(ref, DTensor) or isinstance(t, DTensor):
        return t
    return distribute_tensor(t.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements, src_data_rank=None)


def row_group(p: torch.Tensor):
    """The process group over which ``p``'s rows are split (None when ``p`` is not sharded)."""
    return p.device_mesh.get_group() if isinstance(p, DTensor) else None


def total_norm(tensors: list[torch.Tensor]) -> float:
    """Global L2 norm of possibly sharded tensors: local squared norms summed over ranks."""
    sharded = [local(t).float() for t in tensors if isinstance(t, DTensor)]
    plain = [t.float() for t in tensors if not isinstance(t, DTensor)]
    squares = torch.zeros((), device=(sharded or plain)[0].device) if (sharded or plain) else torch.zeros(())
    for t in sharded:
        squares = squares + t.pow(2).sum()
    if sharded and dist.is_initialized():
        dist.all_reduce(squares)
    for t in plain:
        squares = squares + t.pow(2).sum()
    return float(squares.sqrt())


def clip_sharded_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global gradient norm over all ranks' rows; with ``max_norm``, every local gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))`` (torch's clipping rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads) if grads else 0.0
    if max_norm is not None and math.isfinite(norm):
        coefficient = min(1.0, max_norm / (norm + 1e-6))
        for g in grads:
            local(g).mul_(coefficient)
    return norm


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over ranks, so every rank takes the same branch."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


@contextmanager
def full_parameters(model: nn.Module, is_main: bool, trainable_only: bool) -> Iterator[None]:
    """On rank 0, the model's (trainable) parameters replaced by full CPU copies for the block; collective.

    Every rank gathers each sharded parameter in turn (one at a time, so no rank holds more than one
    full tensor besides rank 0's CPU copies); code in the block reads plain tensors on rank 0, so
    ``save_pretrained`` and the methods' exports work unchanged. The sharded parameters are put back after.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if not isinstance(p, DTensor) or (trainable_only and not p.requires_grad):
                    continue
                whole = p.detach().full_tensor()
                if is_main:
                    module._parameters[name] = nn.Parameter(whole.cpu(), requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
                del whole
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered in full (CPU); collective."""
    state_dict = optimizer.state_dict()
    state_dict["state"] = {
        index: {k: full(v).cpu() if isinstance(v, DTensor) else v for k, v in per_param.items()}
        for index, per_param in state_dict["state"].items()
    }
    return state_dict


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a full state: every state tensor shaped like its sharded parameter is sharded like it
    (in its own dtype: FORA's float32 masters of bf16 weights stay float32)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = like(v, p)


def shard_state_like(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors keyed by parameter name, each sharded like the model's parameter of that name."""
    params = dict(model.named_parameters())
    return {n: like(t, params[n]) if n in params else t for n, t in state.items()}


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def differentiable_local(p: torch.Tensor) -> torch.Tensor:
    """``p``'s local rows with autograd into ``p`` (``to_local``); ``p`` itself when not sharded."""
    return p.to_local() if isinstance(p, DTensor) else p


def sum_over_shards(local_sum: torch.Tensor, sharded: bool) -> torch.Tensor:
    """A penalty summed over row shards: the value is the all-reduced total, the gradient the local part's.

    For a penalty separable over rows, ``sum_i f(theta_i)``, rank ``i``'s rows get exactly their own
    term's gradient, which is all a single process would give them; adding the other ranks' terms as a
    constant makes the logged loss the full one.
    """
    if not sharded or not dist.is_initialized():
        return local_sum
    total = local_sum.detach().clone()
    dist.all_reduce(total)
    return local_sum + (total - local_sum.detach())
