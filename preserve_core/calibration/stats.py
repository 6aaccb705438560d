"""Uncentred input second moments of the target linear layers, accumulated in a streaming pass.

For a target layer ``y = W x`` with ``x`` in R^n and the selected token positions ``1..N``::

    S = sum_i x_i x_i^T   (float32 [n, n], summed over batches and ranks)
    C = S / N

Forward pre-hooks read ``x`` (shape [B, T, n]) under ``torch.no_grad``; a token mask [B, T] picks
the positions that count. Layers reading the same input tensor (see :mod:`.layout`) share one
``S``: only the first hook that sees a tensor object in a forward pass adds it. When every target
layer runs once per forward, the pass stops right after the last one (no final norm, no LM head).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PPFTError
from .dist import Dist
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
    """Summed second moments per input key, reduced over ranks.

    sums[key]: float32 [n, n] whose upper triangle (diagonal included) holds ``sum_i x_i x_i^T``
    (below it: unspecified until :func:`fill_lower`); counts[key]: N, the tokens summed.
    """

    layout: InputLayout
    sums: dict[str, torch.Tensor]
    counts: dict[str, int]

    def dims(self) -> dict[str, int]:
        return {k: int(self.sums[k].shape[0]) for k in self.layout.keys}

    def into_covs(self) -> dict[str, torch.Tensor]:
        """``{key: C}`` (full symmetric [n, n]), dividing the sums in place; the sums are gone after."""
        return {k: fill_lower(self.sums[k]).div_(max(self.counts[k], 1)) for k in self.layout.keys}

    def pop_packed_covs(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{key: upper triangle of C, packed}`` (float32 [n (n + 1) / 2], on ``device``), one key at
        a time: each [n, n] sum is freed as soon as it is packed, so the peak is one extra triangle."""
        packed = {}
        for key in self.layout.keys:
            total = self.sums.pop(key)
            packed[key] = pack_upper(total).div_(max(self.counts[key], 1)).to(device)
            del total
        return packed


class _StopForward(Exception):
    """Raised from the last target layer's hook: the rest of the forward pass is not needed."""


class _Accumulator:
    """The hooks' shared state: sums, counts and the tensors already added in this forward pass."""

    def __init__(self, layout: InputLayout, dims: dict[str, int], device: torch.device, stop_early: bool):
        self.layout = layout
        self.sums = {k: torch.zeros(dims[k], dims[k], dtype=torch.float32, device=device) for k in layout.keys}
        self.counts = {k: 0 for k in layout.keys}
        self.stop_after = layout.stop_after if stop_early else None
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
            add_gram_upper(self.sums[key], rows)
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


GRAM_BLOCK_ROWS = 512  # rows per block of the upper-triangular Gram update
MAX_GRAM_BLOCKS = 8


def gram_blocks(n: int) -> int:
    """Row blocks for width ``n``: about ``GRAM_BLOCK_ROWS`` rows each, 1 to ``MAX_GRAM_BLOCKS``."""
    return max(1, min(MAX_GRAM_BLOCKS, round(n / GRAM_BLOCK_ROWS)))


def add_gram_upper(acc: torch.Tensor, rows: torch.Tensor, blocks: int | None = None) -> None:
    """``acc += X^T X`` on and above the block diagonal only (X = ``rows``, [N, n]).

    Row block ``i`` (columns ``e_i .. e_{i+1}``) gets ``X[:, e_i:e_{i+1}]^T X[:, e_i:]``: with ``b``
    blocks that is ``(b + 1) / (2 b)`` of the full product's work (4: 10/16, 8: 9/16).
    :func:`fill_lower` restores the full matrix.
    """
    n = rows.shape[1]
    blocks = gram_blocks(n) if blocks is None else blocks
    if n < 128 or blocks <= 1:
        acc.addmm_(rows.T, rows)
        return
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        acc[lo:hi, lo:].addmm_(rows[:, lo:hi].T, rows[:, lo:])


def fill_lower(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``acc``'s (in place; one [n, n] temporary)."""
    upper = torch.triu(acc, 1)
    acc.tril_().triu_().add_(upper).add_(upper.T)  # diagonal kept, both triangles from ``upper``
    return acc


def upper_mask(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [n, n], True on and above the diagonal (row-major order defines the packing)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_()


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of ``matrix`` [n, n], row by row: [n (n + 1) / 2].

    Row slices concatenated: no index tensor (boolean indexing would build one of 8 n^2 bytes)."""
    return torch.cat([matrix[i, i:] for i in range(matrix.shape[0])])


def unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The symmetric [n, n] matrix whose upper triangle :func:`pack_upper` packed into ``packed``."""
    if packed.dim() == 2:  # already a full matrix
        return packed
    if packed.numel() != n * (n + 1) // 2:
        raise ValueError(f"a packed triangle of width {n} has {n * (n + 1) // 2} entries, not {packed.numel()}")
    out = torch.zeros(n, n, dtype=packed.dtype, device=packed.device)
    out.masked_scatter_(upper_mask(n, packed.device), packed)  # in place, row-major: the packing order
    return out.add_(torch.triu(out, 1).T)


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


def accumulate_input_stats(
    model: nn.Module,
    module_names: list[str],
    batches: Iterable[dict[str, torch.Tensor]],
    positions: str = "loss",
    dist: Dist | None = None,
    stop_early: bool = True,
) -> InputStats:
    """Sum ``x x^T`` over the selected positions of ``batches`` for every distinct layer input.

    batches: dicts with ``input_ids`` [B, T], ``attention_mask`` [B, T] and (for ``loss``)
    ``labels`` [B, T]. With ``dist``, rank r takes batches i with i % world == r and the sums and
    counts are all-reduced, so every rank returns the global statistics.
    """
    dist = dist or Dist()
    device = _model_device(model)
    layout = discover_layout(model, module_names, device)
    acc = _Accumulator(layout, input_dims(model, layout), device, stop_early)
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: acc.hook(n, args[0])) for n in module_names
    ]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if dist.mine(i):
                    _forward(model, acc, {k: v.to(device) for k, v in batch.items()}, positions)
    finally:
        for h in handles:
            h.remove()
    return _reduce(acc, dist)


def _forward(model: nn.Module, acc: _Accumulator, batch: dict[str, torch.Tensor], positions: str) -> None:
    acc.new_forward(token_mask(batch, positions))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    except _StopForward:
        pass
    acc.new_forward(None)


def _reduce(acc: _Accumulator, dist: Dist) -> InputStats:
    keys = acc.layout.keys
    counts = torch.tensor([acc.counts[k] for k in keys], dtype=torch.float64, device=next(iter(acc.sums.values())).device)
    counts = dist.sum(counts)
    sums = {k: dist.sum(acc.sums.pop(k)) for k in keys}
    return InputStats(acc.layout, sums, {k: int(c) for k, c in zip(keys, counts.tolist(), strict=True)})


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
    covs = stats.into_covs()
    return {n: (covs[k], stats.counts[k]) for n, k in stats.layout.module_to_key.items()}
