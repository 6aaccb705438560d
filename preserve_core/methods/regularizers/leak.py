"""``leak`` regulariser: penalise how far each adapted layer's output moves on the preserve inputs.

For a target ``W`` [m, n] with update ``dW`` and the uncentred preserve second moment
``C_p = E_p[x x^T]`` [n, n] of its input (calibration), the expected squared change of the layer's
output on preserve inputs is ``E_p ||dW x||^2 = tr(dW C_p dW^T) = ||dW L||_F^2`` with ``C_p = L L^T``.
The loss adds, averaged over the ``N`` target layers::

    (lambda / N) sum_layers ||dW L||_F^2 / ||W_0 L||_F^2

each layer's squared output change relative to its own output energy on the same inputs, so
``lambda`` does not depend on the layers' widths or scales (``lambda = 1000``: layers whose outputs
move by about 3% of their size on the preserve inputs, a squared ratio of 1e-3, cost 1 of loss). ``L = V diag(sqrt(mu))`` [n, p] from the eigenpairs of ``C_p`` above
``1e-12 mu_max`` (float64 solve, float32 factor, one per distinct input, shared by the layers reading it).

Where FORA's projection makes ``dW Q = 0`` this reads only the residual the projection leaves
(``dW C_p dW^T = dW P_Q C_p P_Q dW^T``): the part of the preserve inputs FORA's hard constraint lets
through, weighted by how much energy they carry there. Unlike ``kl`` it needs no extra forward pass
and no preserve samples at training time; unlike ``ewc`` it reads the inputs' correlations, not
a diagonal. It is a local (per-layer) proxy: it does not see how a change propagates.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PPFTError
from ..base import PRESERVE_STATS
from ..regularizer_options import LeakRegularizerOptions
from .base import Regularizer

EIGEN_FLOOR = 1e-12  # eigenvalues below this fraction of the largest carry no measurable energy


def covariance_factor(cov: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``L`` [n, p] float32 with ``L L^T = C`` (up to eigenvalues below ``EIGEN_FLOOR`` of the top), from
    the symmetric ``C`` [n, n] (float64; ``eigh`` reads the upper triangle only).

    With ``basis`` ``B`` [n, c] (orthonormal; every row of ``dW`` lies in its span): ``L = B V sqrt(mu)``
    from the eigenpairs of ``B^T C B`` [c, c], so ``dW L L^T dW^T = dW C dW^T`` for every such ``dW``
    with ``p <= c`` columns (FORA: ``c = n - k``)."""
    if basis is not None:
        basis = basis.to(cov.dtype)
    values, vectors = torch.linalg.eigh(cov if basis is None else basis.T @ cov @ basis, UPLO="U")
    keep = values > EIGEN_FLOOR * values.max().clamp_min(0)
    factor = vectors[:, keep] * values[keep].sqrt()
    if basis is not None:
        factor = basis @ factor
    return factor.float().contiguous()


def output_energy(weight: torch.Tensor, cov: torch.Tensor) -> float:
    """``tr(W C W^T)`` for ``W`` [m, n] and the symmetric ``C`` [n, n]."""
    w = weight.to(cov.dtype)
    return float(((w @ cov) * w).sum())


def base_module(model: nn.Module, name: str) -> nn.Module:
    """The target module ``name`` (unwrapped base-model naming) in a plain or PEFT-wrapped model."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.base_model.model.get_submodule(name)


class LeakRegularizer(Regularizer):
    name = "leak"
    Options = LeakRegularizerOptions
    needs = frozenset({PRESERVE_STATS})

    def attach(self, model: nn.Module, method) -> None:
        """One ``L`` per distinct input (and row space) and every layer's ``tr(W_0 C_p W_0^T)``, read before any step."""
        calibration = self.ctx.calibration
        if calibration is None:
            raise PPFTError("leak needs the preserve statistics C_p: run `ppft calibrate <recipe>` first")
        method.track_weight_deltas()
        self.method = method
        factors: dict[str, torch.Tensor] = {}  # per input key (the row space is the input's, delta_row_basis)
        self.factors, self.energies = {}, {}
        read_key, cov = None, None  # layers sharing an input are adjacent: one C_p [n, n] alive at a time
        device = self.ctx.device
        for delta_name in method.delta_names():
            module = delta_name.removesuffix(".weight")
            key = calibration.input_key(module)
            if key != read_key:  # float32 as stored, float64 on the training device, as FORA's own eigensolves
                read_key, cov = key, calibration.preserve_cov(module).to(device=device, dtype=torch.float64)
            if key not in factors:
                basis = method.delta_row_basis(delta_name)
                factors[key] = covariance_factor(cov, None if basis is None else basis.to(device))
            self.factors[delta_name] = factors[key]
            with torch.no_grad():
                self.energies[delta_name] = output_energy(base_module(model, module).weight.detach().to(device), cov) or 1.0

    def on_sharded(self, model: nn.Module, method) -> None:
        if getattr(method, "row_sharded_deltas", False):
            raise PPFTError("leak with a row-sharded form: full under FSDP is not supported yet; use DDP, or a LoRA form")

    def penalty(self) -> torch.Tensor:
        """``(lambda / N) sum ||dW L||^2 / ||W_0 L||^2`` (a scalar with grad). A low-rank ``dW = B A``
        is never formed: ``dW L = B (A L)``, ``r n p + m r p`` flops instead of ``m n p``."""
        factored = self.method.delta_factors()
        if factored is not None:
            moved = {n: b.float() @ (a.float() @ self.factors[n]) for n, (a, b) in factored.items()}
        else:
            moved = {n: d.float() @ self.factors[n] for n, d in self.method.weight_deltas().items()}
        total = sum(m.square().sum() / self.energies[n] for n, m in moved.items())
        return self.options.strength * total / max(len(moved), 1)

    def extra_loss(self, model: nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        return self.penalty() if self.options.strength > 0 else None
