"""The methods' FSDP hooks in one process: a single-rank gloo group and torch's ``fully_shard``.

With one rank every ``Shard(0)`` DTensor holds all rows, so values must equal the unsharded ones
exactly; what the hooks must get right is which tensors become DTensors split like their parameter
(``theta_0``, EWC's Fisher, FORA's decay anchors) and that the sharded code paths
(``row_sharded_deltas``, ProjectedAdamW's all-reduced ``U_1^T X``, the refresh window's all-reduce)
give the one-process answer. The multi-process equivalence runs in tests/test_fsdp.py (slow).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from preserve_core.calibration.gram import UpperGram
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from conftest import build_tiny_llama
from preserve_core.methods.ewc import Ewc, EwcOptions
from preserve_core.methods.folora.refresh import TaskWindow
from preserve_core.methods.fora.method import Fora, ForaOptions
from preserve_core.methods.l2sp import L2sp, L2spOptions
from preserve_core.methods.regularizers.ewc import EwcRegularizer
from preserve_core.methods.regularizer_options import EwcRegularizerOptions
from preserve_core.sharding import FsdpSettings, full, local, shard_model

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A gloo process group of world size 1 (FileStore in a temporary folder), destroyed afterwards."""
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def context(calibration=None, weight_decay: float = 0.0) -> SimpleNamespace:
    recipe = SimpleNamespace(model=SimpleNamespace(train_embeddings=False), training=SimpleNamespace(decay=weight_decay))
    return SimpleNamespace(target_modules=TARGETS, recipe=recipe, device=CPU, calibration=calibration)


def fisher_of(model) -> dict[str, torch.Tensor]:
    """A made-up positive Fisher per trained weight: entry (i, j) = 1 + (i + 2 j) mod 5."""
    out = {}
    for name in TARGETS:
        m, n = model.get_submodule(name).weight.shape
        i, j = torch.arange(m)[:, None], torch.arange(n)[None]
        out[f"{name}.weight"] = (1 + (i + 2 * j) % 5).float()
    return out


def assert_sharded_like(tensor: torch.Tensor, param: torch.Tensor) -> None:
    assert isinstance(tensor, DTensor) and isinstance(param, DTensor)
    assert tensor.placements == param.placements and tensor.device_mesh == param.device_mesh


def test_full_form_baseline_shards_theta0_and_the_fisher(one_rank):
    model = build_tiny_llama(40)
    fisher = fisher_of(model)
    calibration = SimpleNamespace(extra=lambda name: fisher if name == "ewc" else {})
    method = Ewc(EwcOptions(strength=3.0), context(calibration))
    model = method.prepare_model(model)
    shard_model(model, CPU, FsdpSettings(), "no")
    method.on_sharded(model)
    params = dict(model.named_parameters())
    assert method.row_sharded_deltas is True
    assert set(method.trained) == {f"{t}.weight" for t in TARGETS}
    for name, p in method.trained.items():
        assert p is params[name]  # re-pointed to the sharded parameter
        assert_sharded_like(method.theta0[name], p)
        assert_sharded_like(method.regularizer.fisher[name], p)
        torch.testing.assert_close(full(method.theta0[name]), full(p).detach(), atol=0, rtol=0)
        torch.testing.assert_close(full(method.regularizer.fisher[name]), fisher[name], atol=0, rtol=0)
    deltas = {}
    for k, (name, p) in enumerate(method.trained.items()):
        deltas[name] = torch.full(p.shape, 0.1 * (k + 1)).double()
        with torch.no_grad():
            local(p).add_(deltas[name].float())
    penalty = method.penalty()
    expected = 0.5 * 3.0 * sum(float((fisher[n].double() * d**2).sum()) for n, d in deltas.items())
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for name, p in method.trained.items():  # d/dtheta = lambda F dtheta
        torch.testing.assert_close(full(p.grad).double(), 3.0 * fisher[name].double() * deltas[name], atol=1e-5, rtol=1e-5)


def test_full_form_l2sp_sums_its_penalty_over_shards(one_rank):
    model = build_tiny_llama(40)
    method = L2sp(L2spOptions(strength=2.0), context())
    model = method.prepare_model(model)
    shard_model(model, CPU, FsdpSettings(), "no")
    method.on_sharded(model)
    for p in method.trained.values():
        with torch.no_grad():
            local(p).add_(0.5)
    count = sum(p.numel() for p in method.trained.values())
    assert float(method.regularizer.penalty()) == pytest.approx(0.5 * 2.0 * 0.25 * count, rel=1e-5)
    assert set(method.weight_deltas()) == {f"{t}.weight" for t in TARGETS}


def test_lora_form_and_foreign_methods_keep_their_tensors(one_rank):
    model = build_tiny_llama(40)
    fisher = fisher_of(model)
    method = Ewc(EwcOptions(form="lora", r=2, alpha=4.0), context(SimpleNamespace(extra=lambda name: fisher)))
    model = method.prepare_model(model)
    shard_model(model, CPU, FsdpSettings(), "no")
    method.on_sharded(model)
    assert method.row_sharded_deltas is False and method.theta0 == {}
    assert all(not isinstance(method.regularizer.fisher[n], DTensor) for n in fisher)  # dW = s B A is whole
    regularizer = EwcRegularizer(EwcRegularizerOptions(), context())
    regularizer.fisher = dict(fisher)
    regularizer.on_sharded(model, SimpleNamespace())  # a method without row-sharded deltas
    assert all(regularizer.fisher[n] is fisher[n] for n in fisher)


def fora_step(model, method: Fora, seed: int = 0) -> None:
    """One projected AdamW step on a fixed loss; the weights are perturbed first so decay acts."""
    optimizer = method.build_optimizer(model, SimpleNamespace(lr=0.05, adam_betas=(0.9, 0.99), adam_eps=1e-8, decay=0.5))
    for layer in method.layers.values():
        with torch.no_grad():
            local(layer.base.weight).add_(0.01)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (2, 6), generator=g)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def test_fora_full_form_shards_its_anchors_and_steps_like_one_process(one_rank):
    options = ForaOptions(form="full", source="weight", energy=0.5, u_rank=3, spectral_size=0)
    model = build_tiny_llama(40)
    reference_model = copy.deepcopy(model)
    reference = Fora(options, context(weight_decay=0.5))
    reference_model = reference.prepare_model(reference_model)
    fora_step(reference_model, reference)

    method = Fora(options, context(weight_decay=0.5))
    model = method.prepare_model(model)
    shard_model(model, CPU, FsdpSettings(), "no")
    method.on_sharded(model)
    assert set(method.anchors) == set(TARGETS)
    for name, anchor in method.anchors.items():
        weight = method.layers[name].base.weight
        assert_sharded_like(anchor, weight)
        torch.testing.assert_close(full(anchor), full(weight).detach(), atol=0, rtol=0)
    fora_step(model, method)
    rows = method.optimizer._row_blocks
    assert set(rows) == {method.layers[t].base.weight for t in TARGETS}  # U_1's rows, cut once per weight
    for name in TARGETS:
        layer = method.layers[name]
        block = rows[layer.base.weight]
        assert layer.u1.shape[1] == 3 and block.dtype == layer.u1.dtype and not isinstance(block, DTensor)
        torch.testing.assert_close(block, layer.u1, atol=0, rtol=0)  # one rank: all rows
        assert method.optimizer._local_rows(layer.base.weight, layer.u1) is block
        trained = full(layer.base.weight).detach()
        assert (trained - full(method.anchors[name])).abs().max() > 1e-3  # the steps moved W
        torch.testing.assert_close(trained, reference.layers[name].base.weight.detach(), atol=1e-6, rtol=1e-5)


def test_refresh_window_estimates_reduce_over_the_group(one_rank):
    window = TaskWindow("all")
    window.sums["k"] = UpperGram.from_full(torch.full((2, 2), 6.0))
    window.counts["k"] = torch.tensor(3.0, dtype=torch.float64)
    torch.testing.assert_close(dict(window.pop_estimates())["k"], torch.full((2, 2), 2.0), atol=0, rtol=0)
