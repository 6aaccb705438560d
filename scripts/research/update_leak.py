"""What a trained adapter's update does to the preserve and the task inputs, layer by layer.

For each target layer, ``dW = scale * lora_B @ lora_A`` from a run's PEFT adapter ([m, n]) and:
    leak   tr(dW C_p dW^T) / tr(W_0 C_p W_0^T)   output change on the preserve inputs, relative
    task   tr(dW C_t dW^T) / tr(W_0 C_t W_0^T)   likewise on the task inputs
    size   |dW|_F / |W_0|_F
    erank  (sum s)^2 / sum s^2 over dW's singular values
Prints the medians over layers and the ratio task / leak (selectivity). Usage:
    python update_leak.py CALIBRATION_DIR RUN_FINAL_DIR [RUN_FINAL_DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from preserve_core.calibration.store import Calibration, read_manifest
from preserve_core.models import load_model
from preserve_core.recipe_schema import ModelConfig

calib_dir = Path(sys.argv[1])
calibration = Calibration(calib_dir, read_manifest(calib_dir))
base = dict(load_model(ModelConfig(name_or_path="lab:tiny"), "cpu").named_modules())


def measures(final: Path) -> dict[str, list[float]]:
    config = json.loads((final / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    out = {"leak": [], "task": [], "size": [], "erank": []}
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        for key in sorted(k for k in f.keys() if k.endswith("lora_A.weight")):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = f.get_tensor(key).double(), f.get_tensor(key.replace("lora_A", "lora_B")).double()
            dw, w0 = scale * b @ a, base[name].weight.detach().double()
            cp, ct = calibration.preserve_cov(name).double(), calibration.task_cov(name).double()
            s = torch.linalg.svdvals(dw)
            out["leak"].append(float(torch.trace(dw @ cp @ dw.T) / torch.trace(w0 @ cp @ w0.T)))
            out["task"].append(float(torch.trace(dw @ ct @ dw.T) / torch.trace(w0 @ ct @ w0.T)))
            out["size"].append(float(dw.norm() / w0.norm()))
            out["erank"].append(float(s.sum() ** 2 / (s**2).sum()))
    return out


for run in sys.argv[2:]:
    m = measures(Path(run))
    med = {k: statistics.median(v) for k, v in m.items()}
    sel = statistics.median(t / max(lk, 1e-30) for t, lk in zip(m["task"], m["leak"]))
    print(f"{run}: leak {med['leak']:.2e}  task {med['task']:.2e}  task/leak {sel:.0f}  "
          f"|dW|/|W0| {med['size']:.3f}  effective rank {med['erank']:.2f}  (medians over {len(m['leak'])} layers)")
