"""``init: gradient`` (ours, FORA's LoRA form and FoLoRA): an adapter's ``A`` starts along the task gradient it
may read.

A random ``A`` spans a random r-dimensional input subspace, and ``B`` (0 at step 0) can only learn inside it
until ``A`` turns. On the lab's ``rotate`` that cost LoRA, protected or not, 800-1,000 of 2,000 steps on a
loss plateau that full fine-tuning leaves by step 400 (docs/methods/ablations.md section 21). Over the first
``init_rows`` training rows (one forward and backward of the prepared model; ``B = 0``, so the model is the
base) :func:`task_gradients` sums, for each target layer, the task gradient of its dense weight::

    G = sum_t g_t x_t^T          # [m, n]: g_t = dL/dy_t [m], x_t [n]

and each method points ``A``'s rows at the top right singular vectors of ``G`` seen through what it lets
``A`` read, at the mean row norm of the random ``A`` they replace, so ``dL/dB`` is as large as r rows of that
size can make it:

- FORA (:meth:`.fora.layer.ForaLinear.align_a`): ``G P``, ``P`` the input projector (Q removed, shrink applied);
- FoLoRA (:meth:`.folora.layer.FoloraLinear.align_a_tilde`): ``G V_K diag(d)``, ``d`` each column's step.

``B`` stays 0 (LoRA-GA and LoRA-One set ``B`` from the gradient too; LoRA-GA then shifts ``W_0``): the base
is untouched and the adapter exports as a stock PEFT LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import nn


def init_rows_field(factor: str):
    """The ``init_rows`` option of a method with ``init: gradient`` (its rows set ``factor``: "A" or "A~")."""
    return Field(
        128, gt=0, le=10**7, description="init: gradient: training rows (from the start of the data) whose summed "
        f"task gradient sets {factor}; one forward and backward each, batched like training, at set-up only.",
    )  # fmt: skip


def layer_groups(layers: dict[str, nn.Module], budget_bytes: int | None) -> list[list[str]]:
    """``layers``' names in order, cut into consecutive groups whose float32 ``G`` fit in ``budget_bytes``
    together (a layer larger than the budget is a group alone); one group without a budget."""
    groups: list[list[str]] = [[]]
    held = 0
    for name, layer in layers.items():
        size = layer.weight.numel() * 4
        if budget_bytes is not None and groups[-1] and held + size > budget_bytes:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return groups if groups[0] else []


def task_gradients(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[dict], budget_bytes: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, G = sum_t g_t x_t^T)`` [out, in] (float32) for each of ``layers`` over every token of ``batches``.

    The loss is the engine's (``model(**batch).loss``, the mean over the batch's labelled tokens), summed
    over batches, with every module in eval mode (no dropout: no random draw, so the run that follows does
    not depend on how many passes this took; each module's mode is restored). The layers are taken in the
    groups of :func:`layer_groups`, one forward and backward of every batch per group, so at most
    ``budget_bytes`` of ``G`` (or one layer's) are held at once if the caller drops each before asking for
    the next; a layer's ``G`` does not depend on the grouping. Parameter gradients it leaves are cleared.
    """
    batches = list(batches)
    with _eval_mode(model):
        yield from _grouped_gradients(model, layers, batches, budget_bytes)


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _grouped_gradients(model, layers, batches, budget_bytes):
    for group in layer_groups(layers, budget_bytes):
        grads = {name: torch.zeros_like(layers[name].weight, dtype=torch.float32) for name in group}
        handles = [layers[name].register_forward_hook(_tap(grads[name])) for name in group]
        try:
            for batch in batches:
                model(**batch, use_cache=False).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
        for name in group:
            yield name, grads.pop(name)


def _tap(grad_sum: torch.Tensor):
    """A forward hook adding ``g^T x`` of every token into ``grad_sum`` [out, in] when the backward reaches it."""

    def hook(module, args, output):
        x = args[0].detach()

        def add(g: torch.Tensor) -> None:
            grad_sum.addmm_(g.reshape(-1, g.shape[-1]).T.float(), x.reshape(-1, x.shape[-1]).float())

        output.register_hook(add)

    return hook
