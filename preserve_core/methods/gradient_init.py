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

from collections.abc import Iterable

import torch
from torch import nn


def task_gradients(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """``G = sum_t g_t x_t^T`` [out, in] (float32) for each of ``layers`` over every token of ``batches``.

    The loss is the engine's (``model(**batch).loss``, the mean over the batch's labelled tokens), summed
    over batches; parameter gradients it leaves are cleared.
    """
    grads = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in layers.items()}

    def tap(name: str):
        def hook(module, args, output):
            x = args[0].detach()

            def add(g: torch.Tensor) -> None:
                grads[name].addmm_(g.reshape(-1, g.shape[-1]).T.float(), x.reshape(-1, x.shape[-1]).float())

            output.register_hook(add)

        return hook

    handles = [layer.register_forward_hook(tap(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return grads
