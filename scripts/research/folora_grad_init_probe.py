"""Prototype, before any product code: FoLoRA's ``A~`` started along the task gradient its gates let it read
(the analogue of FORA's ``init: gradient``, ablations.md section 21).

FoLoRA's ``A = A~ V_K^T`` and its gated Adam moves column i of ``A~`` by ``d_i = gate_i * step_scale_i`` per
unit step. Over the first ``GRAD_INIT_ROWS`` training rows the task gradient of each dense weight ``G`` [m, n]
is summed (``preserve_core.methods.gradient_init.task_gradients``); ``M = G V_K diag(d)`` [m, K] is what ``B``'s
gradient can reach through ``A~``'s moves, and ``A~ = c Vh_r diag(d)`` with ``Vh_r`` its top-r right singular
vectors: the random ``A~ = init_std * randn * d`` (``init_gated``) with its random rows replaced by aligned
ones, ``c`` so that ``A``'s mean row norm is the random one's. ``B`` stays 0.

    GRAD_INIT_ROWS=128 python scripts/research/folora_grad_init_probe.py scripts/research/h76_folora_grad_init_rotate.yaml

``GATE_FLOOR_R=1`` (h80b): the hard gate opens at least ``r`` directions of each layer input (the top ``r`` by
lambda when fewer than ``r`` pass ``gamma``): a rank-r ``A = A~ V_K^T`` with fewer open columns has rank below r.
"""

from __future__ import annotations

import os
import sys

import torch

from preserve_core.methods.base import Method
from preserve_core.methods.folora.method import Folora
from preserve_core.methods.gradient_init import task_gradients
from preserve_core.training import init_batches

ROWS = int(os.environ.get("GRAD_INIT_ROWS", "128"))
FLOOR_R = os.environ.get("GATE_FLOOR_R") == "1"
_prepare = Folora.prepare_model
_gate = Folora._gate


def floored_gate(self, key):
    gate = _gate(self, key)
    if self.options.gate == "hard" and int(gate.sum()) < self.options.r:
        top = torch.argsort(self.values[key].double(), descending=True)[: self.options.r]
        gate = gate.clone()
        gate[top.to(gate.device)] = 1.0
    return gate


def prepare_model(self, model):
    self._probe_model = _prepare(self, model)
    return self._probe_model


def training_data(self, dataset):
    if isinstance(self, Folora):
        recipe, tokenizer = self.ctx.recipe, self.ctx.tokenizer
        batches = init_batches(dataset, ROWS, recipe, tokenizer, self.ctx.device)
        grads = task_gradients(self._probe_model, self.wrappers, batches)
        with torch.no_grad():
            for key, names in self.names_by_key.items():
                d = (self._gate(key) * self.step_scales[key]).float()
                for name in names:
                    w = self.wrappers[name]
                    m = grads.pop(name) @ w.basis * d  # [m, K]
                    _, _, vh = torch.linalg.svd(m, full_matrices=False)
                    aligned = vh[: w.lora_A_tilde.shape[0]] * d
                    size = w.lora_A().norm(dim=1).mean() / (aligned @ w.basis.T).norm(dim=1).mean().clamp_min(1e-30)
                    w.lora_A_tilde.copy_(aligned * size)
    return dataset


Folora.prepare_model = prepare_model
if FLOOR_R:
    Folora._gate = floored_gate
Method.training_data = training_data

if __name__ == "__main__":
    from cli.main import app

    sys.argv = ["ppft", "bench", sys.argv[1], "--jobs", "1", "--threads", "1"]
    app()
