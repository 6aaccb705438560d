"""Prototype, before any product code: FORA's LoRA form with ``A`` started along the task gradient it can read.

Section 21 measured where rotate's 2,000 steps go: LoRA (protected or not) sits on a plateau (loss ~2.7) for
800-1,000 steps while full fine-tuning leaves it by step 400. A Kaiming ``A`` spans a random r-dimensional
input subspace; ``B`` can only learn inside it until ``A`` turns. Here, after the model is prepared and before
the optimizer is built, each ``ForaLinear``'s accumulated task gradient of the dense weight on the first
``GRAD_INIT_ROWS`` training rows, ``G = sum_t dL/dy_t x_t^T`` [m, n], is taken through the layer's own input
projector (``G P``: Q removed, the shrink applied), and ``A``'s rows become its top-r right singular vectors,
each at the mean Kaiming row norm of the ``A`` it replaces. ``B`` stays 0: the model is unchanged at step 0 and
the adapter still exports as a stock PEFT LoRA (cf. LoRA-GA, LoRA-One, which set ``B`` from the gradient too).

    GRAD_INIT_ROWS=128 python scripts/research/grad_init_probe.py scripts/research/h71_grad_init_rotate.yaml
"""

from __future__ import annotations

import os
import sys

import torch

from preserve_core.data import collate
from preserve_core.methods.base import Method
from preserve_core.methods.fora.method import Fora

ROWS = int(os.environ.get("GRAD_INIT_ROWS", "128"))
BATCH = 32

_prepare = Fora.prepare_model


def prepare_model(self, model):
    self._probe_model = _prepare(self, model)
    return self._probe_model


def training_data(self, dataset):
    if isinstance(self, Fora) and self.options.form == "lora":
        align_a_with_gradient(self, self._probe_model, dataset)
    return dataset


def align_a_with_gradient(method, model, dataset) -> None:
    layers = method.layers
    grads = {name: torch.zeros_like(layer.base.weight, dtype=torch.float32) for name, layer in layers.items()}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():
        def keep_input(module, args, name=name):
            inputs[name] = args[0].detach().float()

        def add_grad(module, grad_in, grad_out, name=name):
            g, x = grad_out[0].float(), inputs[name]
            grads[name] += g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])

        handles += [layer.register_forward_pre_hook(keep_input), layer.register_full_backward_hook(add_grad)]
    pad = method.ctx.tokenizer.pad_token_id or 0
    was_training = model.training
    model.train()
    for start in range(0, min(ROWS, len(dataset)), BATCH):
        rows = [dataset[i] for i in range(start, min(start + BATCH, ROWS, len(dataset)))]
        batch = {k: v.to(method.ctx.device) for k, v in collate(rows, pad).items()}
        model(**batch).loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for name, layer in layers.items():
            readable = layer.projector(grads[name])  # G P: [m, n]
            _, _, vh = torch.linalg.svd(readable, full_matrices=False)
            size = layer.lora_A.norm(dim=1).mean()
            layer.lora_A.copy_(vh[: layer.r] * size)


Fora.prepare_model = prepare_model
Method.training_data = training_data

if __name__ == "__main__":
    from cli.main import app

    sys.argv = ["ppft", "bench", sys.argv[1], "--jobs", "1", "--threads", "1"]
    app()
