"""Which target layers read the same input tensor (q/k/v; gate/up), found by object identity.

One probe forward pass records, for every call of a target linear, the tensor object it was called
on. Layers called on the same object are joined (union-find), so a group holds every layer whose
input statistic is the same matrix. Nothing depends on layer names: a model that feeds q/k/v
separate tensors (after separate norms, say) gets separate groups, as it must.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn



@dataclass
class InputLayout:
    """Target layers grouped by shared input.

    keys: one input key per group, in target order; module_to_key: every target layer -> its key.
    calls_per_forward: how often each layer ran in the probe (0: never, e.g. an unused expert).
    stop_after: (layer, n) such that no target runs after the n-th call of that layer in a forward
    pass, or None unless every layer ran exactly once (a static call pattern).
    call_order: the target layers in the order the probe called them (a layer per call; empty for a
    layout made by hand, whose keys then count as called in ``keys`` order, with no early stop).
    """

    keys: list[str]
    module_to_key: dict[str, str]
    calls_per_forward: dict[str, int]
    stop_after: tuple[str, int] | None
    call_order: list[str] = field(default_factory=list)

    def keys_in_call_order(self) -> list[str]:
        """``keys`` ordered by the first call of any of their layers (never-called keys last)."""
        called = list(dict.fromkeys(self.module_to_key[n] for n in self.call_order))
        return called + [k for k in self.keys if k not in called]

    def stop_after_keys(self, keys: set[str]) -> tuple[str, int] | None:
        """Where a pass that only needs ``keys`` can stop: after the last call of their layers
        (None unless the call pattern is static, as for :attr:`stop_after`)."""
        if self.stop_after is None:
            return None
        last = [n for n in self.call_order if self.module_to_key[n] in keys]
        return (last[-1], 1) if last else None


def group_key(names: list[str]) -> str:
    """``a.b.q_proj`` alone, or ``a.b.{q_proj,k_proj,v_proj}`` for layers sharing one input."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    tails = ",".join(".".join(p[common:]) for p in parts)
    return f"{prefix}.{{{tails}}}" if prefix else f"{{{tails}}}"


def _union_groups(names: list[str], calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first_reader: dict[int, str] = {}
    for name, x in calls:
        other = first_reader.setdefault(id(x), name)  # ids are stable: `calls` keeps every x alive
        parent[root(name)] = root(other)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _has_experts(model: nn.Module) -> bool:
    """Mixture-of-experts routing makes the call pattern data-dependent (no early stop then)."""
    config = getattr(model, "config", None)
    return any(getattr(config, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))


def probe_input_ids(model: nn.Module, length: int = 4) -> torch.Tensor:
    """A [1, length] batch of valid token ids for the probe pass."""
    vocab = int(getattr(model.config, "vocab_size", 2))
    return (torch.arange(length) % max(vocab, 1)).unsqueeze(0)


def discover_layout(model: nn.Module, module_names: list[str], device: torch.device) -> InputLayout:
    """Run one tiny forward and group ``module_names`` by the identity of their input tensors."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
        for name in module_names
    ]
    try:
        with torch.no_grad():
            model(input_ids=probe_input_ids(model).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    counts = {n: 0 for n in module_names}
    for name, _ in calls:
        counts[name] += 1
    groups = _union_groups(module_names, calls)
    module_to_key = {n: group_key(g) for g in groups for n in g}
    static = all(c == 1 for c in counts.values()) and not _has_experts(model)
    stop_after = (calls[-1][0], 1) if static else None
    keys = list(dict.fromkeys(module_to_key[n] for n in module_names))
    return InputLayout(keys, module_to_key, counts, stop_after, [name for name, _ in calls])
