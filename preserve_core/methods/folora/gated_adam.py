"""AdamW whose update is scaled column by column: FoLoRA's direction-wise gated Adam.

For a parameter ``p`` of shape ``[..., K]`` with a gate ``g`` of shape ``[K]`` (``set_gate``), at step t::

    m <- b1 m + (1 - b1) G          v <- b2 v + (1 - b2) G * G
    p <- p - lr * g * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )

so column ``i`` moves ``g_i`` times as far as plain AdamW would move it (its decoupled weight decay too:
a column with ``g_i = 0`` is frozen). The moments themselves are ungated. Parameters without a gate
take exactly the AdamW step. The gate lives in the parameter's optimizer state (key ``gate``), so
``state_dict`` / ``load_state_dict`` carry it and a resumed run continues exactly. Under FSDP a
parameter's rows are split over ranks; the gate acts on columns, so each rank updates its rows alone.
"""

from __future__ import annotations

import math

import torch

from ...sharding import local


class GatedAdamW(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def set_gate(self, param: torch.Tensor, gate: torch.Tensor) -> None:
        """Scale the update of ``param``'s last-dimension columns by ``gate`` ([K]) from the next step on."""
        if gate.shape != param.shape[-1:]:
            raise ValueError(f"a gate of shape {tuple(gate.shape)} does not fit a parameter {tuple(param.shape)}")
        self.state[param]["gate"] = gate.detach().to(device=param.device, dtype=param.dtype).clone()

    def gate(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.state[param].get("gate")

    @torch.no_grad()
    def change_coordinates(self, param: torch.Tensor, t: torch.Tensor) -> None:
        """Move ``param``'s moments into new column coordinates ``x_new = x_old T`` (``T`` [K_old, K_new]).

        The first moment is linear in the gradients, which transform like the parameter: ``m <- m T`` is
        exact. The second moment is not (it would need the cross terms ``E[G_j G_k]``); we use
        ``v <- v (T * T)``, exact when the old coordinates' gradients are uncorrelated, and preserving
        ``sum_i v_i`` per row when ``T`` is orthogonal.
        """
        state = self.state[param]
        if "exp_avg" not in state:
            return
        t = t.to(device=local(param).device, dtype=torch.float64)
        for key, transform in (("exp_avg", t), ("exp_avg_sq", t * t)):
            moment = local(state[key])
            moment.copy_((moment.double() @ transform).to(param.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        b1, b2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        grad, m, v = local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"])
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        update = (m / (1 - b1**t)).div_(denom)
        if group["weight_decay"]:
            update.add_(local(p), alpha=group["weight_decay"])
        gate = state.get("gate")
        if gate is not None:
            update.mul_(gate)
        local(p).add_(update, alpha=-group["lr"])


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The optimizer inside Accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    while not isinstance(optimizer, GatedAdamW) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
