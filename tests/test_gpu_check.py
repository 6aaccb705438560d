"""bench/gpu_check.py: the FLOP count, the peak-FLOPs table, and a CPU run of its smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_qwen3_shape_has_the_published_parameter_counts():
    """Qwen3-1.7B's model card: 1.7B parameters, 1.4B of them non-embedding (28 layers, tied embeddings)."""
    shape = gpu_check.QWEN3_1_7B
    embedding = shape["vocab"] * shape["hidden"]
    flops = gpu_check.flops_per_token(shape, layers=28, seq=1)
    attention = 12 * 28 * shape["heads"] * shape["head_dim"]
    n_matmul = (flops - attention) / 6  # transformer matmuls + the tied LM head
    assert 1.35e9 < n_matmul - embedding < 1.45e9
    assert 1.65e9 < n_matmul < 1.75e9


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [("NVIDIA H100 80GB HBM3", None, 989.0), ("NVIDIA H100 PCIe", None, 756.0), ("NVIDIA H200", None, 989.0),
     ("NVIDIA A100-SXM4-80GB", None, 312.0), ("NVIDIA H200", 500.0, 500.0), ("Some New GPU", None, None)],
)  # fmt: skip
def test_peak_flops_from_device_name(name, override, expected):
    assert gpu_check.peak_tflops(name, override) == expected


@pytest.mark.slow
def test_smoke_mode_runs_every_method_and_keeps_dW_Q_zero(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": str(Path(os.sys.executable))}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == {"full", "lora", "fora_lora", "fora_lora_leak", "fora_full", "folora", "kl", "fora_full_bf16_weights"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in methods.values()), methods
    for label in ("fora_lora", "fora_full"):  # fp32 master weights: the update stays out of span(Q)
        assert methods[label]["dW_Q_over_dW"] < 1e-4 < 0.3 < methods[label]["dW_Q_over_dW_if_blind"]
    # bf16 weights: the optimizer's float32 master obeys dW Q = 0, the stored weights are one rounding (2^-8) away
    assert methods["fora_full_bf16_weights"]["dW_Q_over_W"] <= 2.0**-8
    assert "| fora_full |" in out.with_suffix(".md").read_text()
