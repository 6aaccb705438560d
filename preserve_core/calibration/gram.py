"""Gram sums ``S = sum_i x_i x_i^T`` kept as upper row blocks, and the packed upper-triangle format.

With row-block edges ``0 = e_0 < e_1 < ... < e_b = n``, block ``j`` is ``S[e_j:e_{j+1}, e_j:]``
([h_j, n - e_j] with ``h_j = e_{j+1} - e_j``): the block diagonal and everything right of it, exactly
what the blocked update ``S[e_j:e_{j+1}, e_j:] += X[:, e_j:e_{j+1}]^T X[:, e_j:]`` computes. That is
``sum_j h_j (n - e_j)`` floats: ``(b + 1) / (2 b)`` of ``n^2`` for ``b`` equal blocks (8: 9/16, 4: 10/16),
and as much of the work. ``S`` is symmetric, so nothing is lost.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

GRAM_BLOCK_ROWS = 512  # rows per block of the upper-triangular Gram update
MAX_GRAM_BLOCKS = 8
MIN_BLOCKED_WIDTH = 128  # narrower inputs: one [n, n] block (the split would only cost kernel launches)


EXACT_IN_TF32 = (torch.bfloat16, torch.float16)  # 7 and 10 stored mantissa bits: TF32 keeps 10


@contextmanager
def tf32_where_exact(source_dtype: torch.dtype, device: torch.device | str):
    """TF32 tensor-core products for float32 rows that hold bf16 / fp16 activations on CUDA.

    Those values have at most 10 stored mantissa bits, so TF32's rounding of the inputs changes
    nothing and each product (at most 22 bits) is exact in float32; the sums accumulate in float32
    either way. The statistics are those of the IEEE float32 product (up to summation order) at
    tensor-core speed (H100/H200: about 7x float32's). Anything else runs as before.
    """
    if source_dtype not in EXACT_IN_TF32 or torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def gram_blocks(n: int) -> int:
    """Row blocks for width ``n``: about ``GRAM_BLOCK_ROWS`` rows each, 1 to ``MAX_GRAM_BLOCKS``."""
    return max(1, min(MAX_GRAM_BLOCKS, round(n / GRAM_BLOCK_ROWS)))


def block_edges(n: int, blocks: int | None = None) -> list[int]:
    """``[e_0, ..., e_b]``: ``e_i = round(i n / b)``, or ``[0, n]`` (one block) for narrow inputs."""
    blocks = gram_blocks(n) if blocks is None else blocks
    if n < MIN_BLOCKED_WIDTH or blocks <= 1:
        return [0, n]
    return [round(i * n / blocks) for i in range(blocks + 1)]


def upper_gram_bytes(n: int, blocks: int | None = None) -> int:
    """Bytes an :class:`UpperGram` of width ``n`` holds: ``4 sum_j h_j (n - e_j)``."""
    edges = block_edges(n, blocks)
    return 4 * sum((hi - lo) * (n - lo) for lo, hi in zip(edges[:-1], edges[1:], strict=True))


class UpperGram:
    """A float32 running ``S = sum_i x_i x_i^T`` of width ``n``, held as its upper row blocks."""

    def __init__(self, n: int, device: torch.device | str = "cpu", blocks: int | None = None):
        self.n = n
        edges = block_edges(n, blocks)
        self.spans = list(zip(edges[:-1], edges[1:], strict=True))
        self.blocks = [torch.zeros(hi - lo, n - lo, dtype=torch.float32, device=device) for lo, hi in self.spans]

    @classmethod
    def from_blocks(cls, blocks: list[torch.Tensor]) -> UpperGram:
        """The sum whose upper row blocks are ``blocks`` (as :attr:`blocks` holds them; taken, not copied)."""
        n = blocks[0].shape[1]
        gram = cls.__new__(cls)
        gram.n, gram.blocks, gram.spans, lo = n, list(blocks), [], 0
        for block in blocks:
            gram.spans.append((lo, lo + block.shape[0]))
            lo += block.shape[0]
        if lo != n or any(b.shape[1] != n - s for b, (s, _) in zip(blocks, gram.spans, strict=True)):
            shapes = [tuple(b.shape) for b in blocks]
            raise ValueError(f"blocks of shapes {shapes} are not the upper row blocks of a width-{n} sum")
        return gram

    @classmethod
    def from_full(cls, matrix: torch.Tensor) -> UpperGram:
        """The sum equal to the symmetric ``matrix`` [n, n] (its upper row blocks, copied)."""
        edges = block_edges(matrix.shape[0])
        spans = zip(edges[:-1], edges[1:], strict=True)
        return cls.from_blocks([matrix[lo:hi, lo:].float().clone() for lo, hi in spans])

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def add_(self, rows: torch.Tensor, source_dtype: torch.dtype = torch.float32) -> None:
        """``S += X^T X`` on and right of the block diagonal (``X`` = ``rows``, float32 [N, n], whose values
        came from ``source_dtype``: bf16 / fp16 on CUDA multiply in TF32, exactly; :func:`tf32_where_exact`)."""
        with tf32_where_exact(source_dtype, rows.device):
            for (lo, hi), block in zip(self.spans, self.blocks, strict=True):
                block.addmm_(rows[:, lo:hi].T, rows[:, lo:])

    def reduce_(self, reduce_sum) -> None:
        """Replace each block by ``reduce_sum(block)`` (an all-reduce over processes)."""
        self.blocks = [reduce_sum(b) for b in self.blocks]

    def pop_packed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The upper triangle of ``S`` row by row (as :func:`pack_upper`), float32 [n (n + 1) / 2] on
        ``device``, emptying this sum block by block: row ``r = e_j + t`` of block ``j`` holds
        ``S[r, e_j:]``, of which ``S[r, r:]`` is its slice from ``t``. Besides the output, the peak is
        the blocks not yet packed plus one block's rows."""
        out = torch.empty(self.n * (self.n + 1) // 2, dtype=torch.float32, device=device)
        start = 0
        while self.blocks:
            (lo, hi), block = self.spans.pop(0), self.blocks.pop(0)
            rows = torch.cat([block[t, t:] for t in range(hi - lo)])
            out[start : start + rows.numel()].copy_(rows)
            start += rows.numel()
            del block, rows
        return out

    def full(self) -> torch.Tensor:
        """The symmetric [n, n] ``S`` (a new tensor; the blocks stay)."""
        out = torch.zeros(self.n, self.n, dtype=torch.float32, device=self.blocks[0].device)
        for (lo, hi), block in zip(self.spans, self.blocks, strict=True):
            out[lo:hi, lo:] = block
        return fill_lower(out)


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
