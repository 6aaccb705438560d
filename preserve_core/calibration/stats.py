"""Uncentred input second moments of the target linear layers, accumulated in a streaming pass.

For a target layer ``y = W x`` with ``x`` in R^n and the selected token positions ``1..N``::

    S = sum_i x_i x_i^T   (float32, summed over batches and ranks; held as its upper row blocks,
                           about 9/16 of n^2, see :mod:`.gram`)
    C = S / N

Forward pre-hooks read ``x`` (shape [B, T, n]) under ``torch.no_grad``; a token mask [B, T] picks
the positions that count. Layers reading the same input tensor (see :mod:`.layout`) share one
``S``: only the first hook that sees a tensor object in a forward pass adds it. When every target
layer runs once per forward, the pass stops right after the last one (no final norm, no LM head).

With a memory budget the inputs are covered in several passes over the same batches, each holding
the sums of one group of consecutive inputs and stopping after the group's last layer: pass ``g``
costs a forward through the layers up to its group's last, so ``G`` equal groups cost about
``(G + 1) / 2`` forwards' worth of layers instead of one; the Gram work is unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PPFTError
from .dist import Dist
from .gram import UpperGram, upper_gram_bytes
from .layout import InputLayout, discover_layout

IGNORE = -100


def token_mask(batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """Bool [B, T]: the token positions whose layer inputs count.

    ``all``: every non-pad position (``attention_mask == 1``).
    ``loss``: non-pad positions ``t`` with ``labels[t + 1] != -100``: the positions whose logits the
    causal-LM loss scores (the model shifts labels by one internally). For prompt/completion data
    that is the last prompt token through the last completion token; the final eos is a target,
    never an input, so it does not count.
    """
    ids = batch["input_ids"]
    attention = batch.get("attention_mask")
    real = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
    if positions == "all":
        return real
    if positions != "loss":
        raise ValueError(f"positions must be 'loss' or 'all', not {positions!r}")
    if "labels" not in batch:
        raise PPFTError("task statistics over loss positions need 'labels' in each batch")
    scored = torch.zeros_like(real)
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE
    return scored & real


@dataclass
class InputStats:
    """Summed second moments of some input keys, reduced over ranks.

    sums[key]: the :class:`UpperGram` of ``sum_i x_i x_i^T`` (its upper row blocks, float32);
    counts[key]: N, the tokens summed. ``layout`` is the whole model's, whichever keys are here.
    """

    layout: InputLayout
    sums: dict[str, UpperGram]
    counts: dict[str, int]

    def dims(self) -> dict[str, int]:
        return {k: self.sums[k].n for k in self.sums}

    def pop_cov(self, key: str) -> torch.Tensor:
        """``C`` of ``key`` (full symmetric [n, n]), its sum dropped from these statistics."""
        return self.sums.pop(key).full().div_(max(self.counts[key], 1))

    def into_covs(self) -> dict[str, torch.Tensor]:
        """``{key: C}`` (full symmetric [n, n]); the sums are dropped key by key as each ``C`` is built."""
        return {k: self.pop_cov(k) for k in list(self.sums)}

    def pop_packed_covs(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{key: upper triangle of C, packed}`` (float32 [n (n + 1) / 2], on ``device``), one key at
        a time, each sum emptied block by block as it is packed (:meth:`UpperGram.pop_packed`)."""
        return {k: self.sums.pop(k).pop_packed(device).div_(max(self.counts[k], 1)) for k in list(self.sums)}

    def merge(self, other: InputStats) -> InputStats:
        return InputStats(self.layout, {**self.sums, **other.sums}, {**self.counts, **other.counts})


class _StopForward(Exception):
    """Raised from the hook of a pass's last needed layer: the rest of the forward pass is not needed."""


class _Accumulator:
    """The hooks' shared state: sums and counts of this pass's keys, and the tensors already added in
    the current forward pass."""

    def __init__(self, layout: InputLayout, keys: list[str], dims: dict[str, int], device: torch.device,
                 stop_after: tuple[str, int] | None):  # fmt: skip
        self.layout = layout
        self.sums = {k: UpperGram(dims[k], device) for k in keys}
        self.counts = {k: 0 for k in keys}
        self.stop_after = stop_after
        self.mask: torch.Tensor | None = None
        self.new_forward(None)

    def new_forward(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.seen: dict[int, tuple[weakref.ref, str]] = {}
        self.calls = {n: 0 for n in self.layout.module_to_key}

    def hook(self, name: str, x: torch.Tensor) -> None:
        key = self.layout.module_to_key[name]
        self.calls[name] += 1
        if not self._already_added(key, x):
            rows = select_rows(x, self.mask)
            self.sums[key].add_(rows, x.dtype)
            self.counts[key] += rows.shape[0]
        if self.stop_after == (name, self.calls[name]):
            raise _StopForward

    def _already_added(self, key: str, x: torch.Tensor) -> bool:
        ref, owner = self.seen.get(id(x), (None, None))
        if ref is not None and ref() is x:
            if owner != key:
                raise PPFTError(f"input of {key} is also read by {owner}, which the probe pass did not show")
            return True
        self.seen[id(x)] = (weakref.ref(x), key)
        return False


def select_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` ([B, T, n], or [B*T, n]) at ``mask`` ([B, T]) as float32 [N_b, n]."""
    if x.shape[:-1] == mask.shape:
        rows = x[mask] if not bool(mask.all()) else x.reshape(-1, x.shape[-1])
    elif x.dim() == 2 and x.shape[0] == mask.numel():
        rows = x[mask.reshape(-1)]
    else:
        raise PPFTError(f"a target layer's input has shape {tuple(x.shape)}, which does not match the batch {tuple(mask.shape)}")
    return rows.float()


def input_dims(model: nn.Module, layout: InputLayout) -> dict[str, int]:
    dims = {}
    for name, key in layout.module_to_key.items():
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        n = getattr(module, "in_features", None) or (weight.shape[0] if weight is not None else None)
        if n is None:
            raise PPFTError(f"cannot tell the input width of target layer {name}")
        dims[key] = int(n)
    return dims


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def plan_passes(layout: InputLayout, dims: dict[str, int], budget_bytes: int | None) -> list[list[str]]:
    """The input keys in forward order, cut into consecutive groups whose sums together take at most
    ``budget_bytes`` (:func:`upper_gram_bytes` each); a key wider than the budget is a group alone.
    One group (one pass) when ``budget_bytes`` is None or everything fits."""
    groups: list[list[str]] = [[]]
    held = 0
    for key in layout.keys_in_call_order():
        size = upper_gram_bytes(dims[key])
        if groups[-1] and budget_bytes is not None and held + size > budget_bytes:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += size
    return groups


def input_stats_passes(
    model: nn.Module,
    module_names: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    positions: str = "loss",
    dist: Dist | None = None,
    budget_bytes: int | None = None,
    stop_early: bool = True,
) -> Iterator[InputStats]:
    """Sum ``x x^T`` over the selected positions of ``batches`` for every distinct layer input, in
    passes over the batches (:func:`plan_passes`): each yields the reduced sums of one group of keys,
    having held only that group's on the device, and stops the forward after its last layer when the
    call pattern is static. Each key's sum is the same sequence of updates whatever the grouping.

    batches: dicts with ``input_ids`` [B, T], ``attention_mask`` [B, T] and (for ``loss``)
    ``labels`` [B, T]. With ``dist``, rank r takes batches i with i % world == r and the sums and
    counts are all-reduced, so every rank gets the global statistics (``budget_bytes`` must agree).
    ``stop_early=False`` runs every forward to the end.
    """
    dist = dist or Dist()
    device = _model_device(model)
    layout = discover_layout(model, module_names, device)
    dims = input_dims(model, layout)
    batches = list(batches)
    for keys in plan_passes(layout, dims, budget_bytes):
        acc = _Accumulator(layout, keys, dims, device, layout.stop_after_keys(set(keys)) if stop_early else None)
        names = [n for n in module_names if layout.module_to_key[n] in acc.sums]
        handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: acc.hook(n, args[0])) for n in names]
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    if dist.mine(i):
                        _forward(model, acc, {k: v.to(device) for k, v in batch.items()}, positions)
        finally:
            for h in handles:
                h.remove()
        yield _reduce(acc, dist, device)
        del acc


def accumulate_input_stats(
    model: nn.Module,
    module_names: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    positions: str = "loss",
    dist: Dist | None = None,
    budget_bytes: int | None = None,
    stop_early: bool = True,
) -> InputStats:
    """Every key's sums at once (the passes of :func:`input_stats_passes`, merged)."""
    merged = None
    for part in input_stats_passes(model, module_names, batches, positions, dist, budget_bytes, stop_early):
        merged = part if merged is None else merged.merge(part)
    return merged


AUTO_BUDGET_FRACTION = 0.75  # of the free device memory; the rest is left to the forward's activations


def current_covs(
    model: nn.Module, module_names: list[str], batches: list[dict], device, budget_bytes: int | None = None
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(the modules reading one input, its C [n, n] on device)`` over every real token of ``batches``,
    measured on ``model`` as it is now (eval mode, no grad; its mode restored at the end), one input at a
    time in the passes of :func:`input_stats_passes` (``budget_bytes``): each matrix is handed over before
    the next is built, so the caller holds one ``[n, n]`` at a time if it drops each before asking again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for stats in input_stats_passes(model, module_names, batches, positions="all", budget_bytes=budget_bytes):
                for key in list(stats.sums):
                    readers = [n for n in module_names if stats.layout.module_to_key[n] == key]
                    yield readers, stats.pop_cov(key).to(device)
    finally:
        model.train(was_training)


def stats_budget_bytes(memory_gb: float | None, device: torch.device, dist: Dist | None = None) -> int | None:
    """The bytes the statistics' sums may hold at once: ``memory_gb`` (1e9 bytes each) when given; else,
    on CUDA, ``AUTO_BUDGET_FRACTION`` of the free device memory (the least over ranks, so all ranks plan
    the same passes); else None (no limit: one pass)."""
    if memory_gb is not None:
        return int(memory_gb * 1e9)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return min((dist or Dist()).gather([int(free * AUTO_BUDGET_FRACTION)]))


def _forward(model: nn.Module, acc: _Accumulator, batch: dict[str, torch.Tensor], positions: str) -> None:
    acc.new_forward(token_mask(batch, positions))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    except _StopForward:
        pass
    acc.new_forward(None)


def _reduce(acc: _Accumulator, dist: Dist, device: torch.device) -> InputStats:
    keys = list(acc.sums)
    counts = dist.sum(torch.tensor([acc.counts[k] for k in keys], dtype=torch.float64, device=device))
    for gram in acc.sums.values():
        gram.reduce_(dist.sum)
    return InputStats(acc.layout, acc.sums, {k: int(c) for k, c in zip(keys, counts.tolist(), strict=True)})


def collect_input_stats(
    model: nn.Module,
    module_names: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    positions: str = "loss",
    accelerator=None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """``{module name: (C [n, n] float32, N)}`` with ``C = (1/N) sum_i x_i x_i^T`` over ``positions``.

    Layers that share an input get the *same* tensor object (one matrix per distinct input).
    See :func:`token_mask` for which positions ``loss`` and ``all`` select.
    """
    stats = accumulate_input_stats(model, module_names, batches, positions, Dist(accelerator))
    module_to_key = stats.layout.module_to_key
    counts = stats.counts
    covs = stats.into_covs()
    return {n: (covs[k], counts[k]) for n, k in module_to_key.items()}
