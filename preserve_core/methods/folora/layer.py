"""The FoLoRA linear wrapper: a LoRA whose ``A`` lives in spectral coordinates.

``y = W x (+ b) + (alpha / r) B (A x)`` with ``A = A~ V_K^T``: ``A~`` trainable [r, K], ``B`` trainable
[m, r], ``V_K`` a fixed buffer [n, K]. ``A`` ([r, n]) is formed once per forward call (one r x K x n
product), so the per-token cost equals plain LoRA's. The adapter branch runs in float32 even under
autocast: ``V_K``'s columns are long along directions the preserve data barely excite, so ``A`` can
have large entries whose bf16 rounding would swamp ``A x``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class FoloraLinear(nn.Module):
    def __init__(
        self, base_layer: nn.Linear, vectors: torch.Tensor, r: int, alpha: float, dropout: float, init_std: float
    ):
        super().__init__()
        self.base_layer = base_layer
        m, _ = base_layer.weight.shape
        device = base_layer.weight.device
        self.register_buffer("basis", vectors.to(device=device, dtype=torch.float32).contiguous(), persistent=False)
        k = vectors.shape[1]
        self.lora_A_tilde = nn.Parameter(torch.randn(r, k, device=device) * init_std)
        self.lora_B = nn.Parameter(torch.zeros(m, r, device=device))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.record_inputs = False  # keep the latest training input for FoLoRA's C_t refresh
        self.last_input: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``W`` [m, n] (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        """``n`` (what measuring this layer's input statistics on the wrapped model reads)."""
        return self.base_layer.in_features

    def lora_A(self) -> torch.Tensor:
        """``A = A~ V_K^T``, float32 [r, n]."""
        return self.lora_A_tilde @ self.basis.T

    @torch.no_grad()
    def align_a_tilde(self, task_grad: torch.Tensor, column_steps: torch.Tensor) -> None:
        """``init: gradient``: ``A~ <- c Vh_r diag(d)`` with ``Vh_r`` the top-r right singular vectors of
        ``G V_K diag(d)`` (``task_grad = G`` [m, n], ``column_steps = d`` [K], each column's step: gate times
        step scale), ``c`` so that ``A``'s mean row norm is the random ``A``'s it replaces.

        ``dL/dB = (alpha / r) G V_K A~^T = (alpha / r) c U_r S_r`` is then as large as the columns the gated
        Adam moves allow. With ``min(m, K) < r`` the remaining rows stay random."""
        d = column_steps.to(self.basis)
        _, _, vh = torch.linalg.svd((task_grad.to(self.basis) @ self.basis) * d, full_matrices=False)
        k = min(self.lora_A_tilde.shape[0], vh.shape[0])
        aligned = vh[:k] * d
        size = self.lora_A().norm(dim=1).mean() / (aligned @ self.basis.T).norm(dim=1).mean().clamp_min(1e-30)
        self.lora_A_tilde[:k].copy_(aligned * size)

    def delta_weight(self) -> torch.Tensor:
        """``dW = (alpha / r) B A``, float32 [m, n]."""
        return self.scaling * (self.lora_B @ self.lora_A())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record_inputs and self.training:
            self.last_input = x.detach()
        y = self.base_layer(x)
        if not self.enabled:
            return y
        with torch.autocast(x.device.type, enabled=False):  # float32: A can be large where C_p is small
            a = self.lora_A()
            h = self.dropout(x).to(a.dtype)
            delta = self.scaling * ((h @ a.T) @ self.lora_B.T)
        return y + delta.to(y.dtype)


def default_init_std(c_p_trace: float, n: int, k: int) -> float:
    """Std of ``A~``'s entries so the initial adapter activations match PEFT's LoRA init.

    PEFT draws ``A`` with variance ``1 / (3n)``, so ``E[(a^T x)^2] = tr(C_p) / (3n)`` on preserve inputs;
    here ``E[(a^T x)^2] ~ a^T M a = |a~|^2 = K std^2``. Equal when ``std^2 = tr(C_p) / (3 n K)``.
    """
    return math.sqrt(max(c_p_trace, 1e-12) / (3 * n * k))


def install(model: nn.Module, name: str, wrapper_factory) -> FoloraLinear:
    """Replace the linear ``name`` of ``model`` by ``wrapper_factory(linear)``; returns the wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = wrapper_factory(getattr(parent, child))
    setattr(parent, child, wrapper)
    return wrapper


@contextlib.contextmanager
def plain_linears(model: nn.Module, wrappers: dict[str, FoloraLinear], merge: bool):
    """Temporarily put plain ``nn.Linear`` layers back (weights ``W + dW`` when ``merge``); restores after."""
    try:
        for name, wrapper in wrappers.items():
            base = wrapper.base_layer
            if merge:
                merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
                with torch.no_grad():
                    merged.weight = nn.Parameter((base.weight.float() + wrapper.delta_weight()).to(base.weight.dtype))
                    if base.bias is not None:
                        merged.bias = nn.Parameter(base.bias.detach().clone())
                base = merged
            _set(model, name, base)
        yield model
    finally:
        for name, wrapper in wrappers.items():
            _set(model, name, wrapper)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def attach_disable_adapter(model: nn.Module, wrappers: dict[str, FoloraLinear]) -> None:
    """Give ``model`` PEFT's ``disable_adapter()`` context, so ``kl_to_base`` can score the base model."""

    @contextlib.contextmanager
    def disable_adapter():
        states = {n: w.enabled for n, w in wrappers.items()}
        for w in wrappers.values():
            w.enabled = False
        try:
            yield
        finally:
            for n, w in wrappers.items():
                w.enabled = states[n]

    model.disable_adapter = disable_adapter
