"""The memory model of docs/memory.md: bytes each method stores on disk and holds in memory, from the shape.

Notation per decoder layer (see :class:`realshape.Shape`): distinct target inputs of widths ``n_j``
(attention in, o_proj in, MLP in, down_proj in) and seven target linears ``W_i`` [m_i, n_i]. Every
formula is in bytes; ``L`` layers.

Calibration
    disk:  4 * sum_j n_j (n_j + 1) / 2 per statistic the method reads (packed float32 upper triangles)
    sums:  g(n) = 4 * sum_b h_b (n - e_b) per input: the upper row blocks of its float32 Gram sum (b = 8
           blocks of n / 8 rows at real widths: 9/16 of 4 n^2; one n x n block below width 128).
           One pass (no budget): sum over all inputs of the model. With a budget B: the inputs in forward
           order are cut into consecutive groups of at most B (an input wider than B alone), one pass over
           the data per group; the peak is the largest group's, and pass g runs the forward through its
           group's last layer (cost: sum of those depths, in forwards through all layers).
    peak:  the sums (above) + the forward's own activations (measured: any inference forward needs them);
           the packed triangles of finished inputs are on the host, not the device
FORA (LoRA form) set-up
    held:  4 * sum_j n_j min(k_j, n_j - k_j)  (one Q or Q_c per distinct input)
           + 4 * sum_i (m_i r_u,i + (m_i + n_i) s)  (U_1, U_c, V_c per layer)
    peak:  held + one input's eigensolve: 32 n^2 (float64 matrix, eigenvectors, LAPACK syevd workspace
           2 n^2 doubles), n the widest input (reading the stored triangle before it needs 15 n^2)
FoLoRA set-up
    held:  4 * sum_j n_j K_j  (one float32 V_K per distinct input; K = n by default) + 8 * sum_j K_j (lambda)
    peak:  held + one input's solve: C_p and C_t as float32 (8 n^2) + about five float64 [n, n] (40 n^2)
init: gradient (FORA's LoRA form, FoLoRA) set-up
    held:  4 * m_i n_i per target (float32 G), the targets in forward order cut into consecutive groups of
           at most calibration.stats_memory_gb (a target larger alone); one forward and backward of the
           init_rows rows per group; the peak is the largest group's, plus the backward's own activations
LoRA-type adapter (A, B) and its AdamW state, per target: 4 * r (m + n) * 3 (parameter, two moments)
Checkpoint of an adapter method: the adapter + its AdamW state (+ FoLoRA's lambda; FORA: a 32-byte hash)
"""

from __future__ import annotations

from realshape import Shape

F32, F64 = 4, 8


def calibration_disk(shape: Shape, layers: int, n_stats: int) -> int:
    return n_stats * layers * sum(F32 * n * (n + 1) // 2 for n in shape.input_widths())


def gram_sums(n: int) -> int:
    """Bytes of one input's running sum: its upper row blocks, ``round(n / 512)`` clamped to 1..8 blocks."""
    blocks = max(1, min(8, round(n / 512)))
    if n < 128 or blocks == 1:
        return F32 * n * n
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    return F32 * sum((hi - lo) * (n - lo) for lo, hi in zip(edges[:-1], edges[1:]))


def calibration_passes(shape: Shape, layers: int, budget: int | None = None) -> tuple[int, int, float]:
    """``(passes, largest group's sums in bytes, forward cost in full forwards)`` of one statistic."""
    sizes = [(layer, gram_sums(n)) for layer in range(layers) for n in shape.input_widths()]
    groups, held = [[]], 0
    for layer, size in sizes:
        if groups[-1] and budget is not None and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append((layer, size))
        held += size
    largest = max(sum(size for _, size in g) for g in groups)
    depth = sum(g[-1][0] + 1 for g in groups) / layers
    return len(groups), largest, depth


def calibration_peak(shape: Shape, layers: int, budget: int | None = None) -> int:
    """Device bytes of the running sums of one statistic (the forward's own activations come on top:
    those of any inference forward over one statistics batch)."""
    return calibration_passes(shape, layers, budget)[1]


def calibration_peak_full_square(shape: Shape, layers: int) -> int:
    """Before: a full [n, n] float32 sum per input, all inputs at once."""
    return layers * sum(F32 * n * n for n in shape.input_widths())


def gradient_init_passes(shape: Shape, layers: int, budget: int | None = None) -> tuple[int, int]:
    """``(passes, largest group's float32 G in bytes)`` of ``init: gradient``."""
    sizes = [F32 * m * n for _ in range(layers) for _, m, n in shape.target_shapes()]
    groups, held = [0], 0
    for size in sizes:
        if held and budget is not None and held + size > budget:
            groups.append(0)
            held = 0
        groups[-1] += size
        held += size
    return len(groups), max(groups)


def fora_held(shape: Shape, layers: int, ks: list[int], r_u: dict[str, int], s: int) -> int:
    """``ks``: k_j per distinct input of one layer; ``r_u``: r_u per target name."""
    bases = sum(F32 * n * min(k, n - k) for n, k in zip(shape.input_widths(), ks, strict=True))
    per_target = sum(F32 * (m * r_u[name] + (m + n) * s) for name, m, n in shape.target_shapes())
    return layers * (bases + per_target)


def fora_transient(shape: Shape) -> int:
    """float64 ``eigh`` of the widest input: input copy, eigenvectors, ``syevd`` workspace (2 n^2 doubles)."""
    n = max(shape.input_widths())
    return 32 * n * n


def folora_held(shape: Shape, layers: int, keep_fraction: float = 1.0) -> int:
    return layers * sum(F32 * n * int(n * keep_fraction) + F64 * int(n * keep_fraction) for n in shape.input_widths())


def folora_transient(shape: Shape) -> int:
    n = max(shape.input_widths())
    return 48 * n * n


def adapter_with_adam(shape: Shape, layers: int, r: int, extra_rows: int = 0) -> int:
    """LoRA A [r, n], B [m, r] (+ FORA's ``s`` delta scalars via ``extra_rows``) with two AdamW moments."""
    per_layer = sum(F32 * (r * (m + n) + extra_rows) for _, m, n in shape.target_shapes())
    return 3 * layers * per_layer


def adapter_params(shape: Shape, layers: int, r: int, extra_rows: int = 0) -> int:
    return layers * sum(F32 * (r * (m + n) + extra_rows) for _, m, n in shape.target_shapes())


def model_weights(shape: Shape, layers: int, bytes_per: int = 2, vocab: int = 0) -> int:
    """Decoder-layer weights (+ ``vocab`` x hidden for embeddings and head) in ``bytes_per`` bytes each."""
    per_layer = sum(m * n for _, m, n in shape.target_shapes())
    return bytes_per * (layers * per_layer + 2 * vocab * shape.hidden)


def full_size_rows(shape: Shape, vocab: int, r: int = 8, s: int = 8) -> dict[str, int]:
    """Predictions at the real depth, worst case for FORA's caps (``k = n/2``, ``r_u = m/4``)."""
    layers = shape.layers
    ks = [n // 2 for n in shape.input_widths()]
    r_u = {name: m // 4 for name, m, _ in shape.target_shapes()}
    return {
        "model weights, bf16": model_weights(shape, layers, 2, vocab),
        "calibration on disk, FORA (C_p)": calibration_disk(shape, layers, 1),
        "calibration on disk, FoLoRA (C_p, C_t)": calibration_disk(shape, layers, 2),
        "calibration sums, one statistic, was (full n x n, one pass)": calibration_peak_full_square(shape, layers),
        "calibration sums, one statistic (upper blocks, one pass)": calibration_peak(shape, layers),
        "calibration sums, stats_memory_gb 8 (largest pass)": calibration_peak(shape, layers, 8 * 10**9),
        "calibration sums, stats_memory_gb 2 (largest pass)": calibration_peak(shape, layers, 2 * 10**9),
        "FORA bases held (k = n/2, r_u = m/4, s = 8)": fora_held(shape, layers, ks, r_u, s),
        "FORA bases held, u_rank 0, spectral_size 0": fora_held(shape, layers, ks, {k: 0 for k in r_u}, 0),
        "FoLoRA V_K held (K = n)": folora_held(shape, layers),
        "init: gradient, G of every target (one pass)": gradient_init_passes(shape, layers)[1],
        "init: gradient, stats_memory_gb 2 (largest group)": gradient_init_passes(shape, layers, 2 * 10**9)[1],
        "set-up transient, FORA (one input)": fora_transient(shape),
        "set-up transient, FoLoRA (one input)": folora_transient(shape),
        "LoRA r=8 + AdamW state": adapter_with_adam(shape, layers, r),
        "checkpoint, FORA/FoLoRA/LoRA (adapter + AdamW)": adapter_with_adam(shape, layers, r, s),
    }
