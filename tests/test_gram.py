"""TF32 for the Gram sums only where it is exact: bf16 / fp16 activations on CUDA."""

from __future__ import annotations

import torch

from preserve_core.calibration.gram import tf32_where_exact


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of float32 ``x`` to TF32 (10 stored mantissa bits), from the bit pattern."""
    bits = x.view(torch.int32).to(torch.int64)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) >> 13) << 13
    return rounded.to(torch.int32).view(torch.float32)


def test_bf16_and_fp16_values_are_tf32_values_and_their_products_are_exact_in_float32():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(4096) * 3).to(dtype).float()
        assert torch.equal(tf32_round(x), x)
        a, b = x[:2048], x[2048:]
        assert torch.equal((a * b).double(), a.double() * b.double())
    plain = torch.tensor([1.0 + 2**-20])  # a float32 value TF32 would change
    assert not torch.equal(tf32_round(plain), plain)


def test_tf32_is_switched_on_for_low_precision_sources_on_cuda_only_and_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_where_exact(torch.bfloat16, "cuda"):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    for dtype, device in ((torch.float32, "cuda"), (torch.bfloat16, "cpu"), (torch.float16, "cpu")):
        with tf32_where_exact(dtype, device):
            assert matmul.fp32_precision == before
    try:
        with tf32_where_exact(torch.float16, torch.device("cuda", 0)):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert matmul.fp32_precision == before
