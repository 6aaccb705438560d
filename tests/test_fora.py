"""FORA and weightproj: rank selection, the projected AdamW, the constraints after training, exports, resume."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_same_tensors, reverse_examples, run_recipe, write_jsonl
from preserve_core.checkpoint import list_checkpoints
from preserve_core.methods.fora.layer import ForaLinear
from preserve_core.methods.fora.bases import project_left, project_right, select_rank
from preserve_core.methods.fora.optim import ProjectedAdamW
from preserve_core.recipe import load_recipe
from preserve_core.training import train

IDS = torch.tensor([[1, 21, 8, 25, 43, 4, 5, 41]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibration_settings(tmp_path_factory) -> dict:
    """Preserve statistics from a small text file, shared by every fora run of this module (computed once)."""
    root = tmp_path_factory.mktemp("fora-cal")
    rows = [{"text": r["prompt"] + r["completion"]} for r in reverse_examples(32, seed=5)]
    texts = write_jsonl(root / "preserve.jsonl", rows)
    return {"preserve_source": "dataset", "preserve_data": str(texts), "num_samples": 32, "stats_batch_size": 16,
            "max_task_examples": 16, "dir": str(root / "calibration")}  # fmt: skip


def fora_recipe(write_recipe, calibration_settings, name, method, **training):
    method = {"name": "fora", "energy": 0.9, "max_rank": 0.5, "u_rank": 4, "spectral_size": 2, **method}
    common = {"max_steps": 6, "lr": 2e-2, "schedule": "constant", **training}
    return write_recipe(name, method=method, training=common, calibration=calibration_settings)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# rank selection and the optimizer
# ---------------------------------------------------------------------------------------------


def test_rank_selection_by_energy_count_and_cap():
    values = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # sum 10: cumulative 0.5, 0.8, 0.9, 0.95, 1.0
    assert select_rank(values, 0.8, None, 100) == 2
    assert select_rank(values, 0.81, None, 100) == 3
    assert select_rank(values, 0.95, None, 100) == 4
    assert select_rank(values, 1.0, None, 5) == 5
    assert select_rank(values, 0.95, None, 0.5) == 2  # fraction cap: floor(0.5 * 5)
    assert select_rank(values, 0.95, None, 3) == 3  # count cap
    assert select_rank(values, 0.95, None, 1.0) == 1  # 1.0 is a count, not a fraction
    assert select_rank(values, 0.5, 4, 0.2) == 4  # explicit count overrides energy and cap
    assert select_rank(values, 0.0, None, 100) == 0
    assert select_rank(values, 0.9, 0, 100) == 0


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("k", [3, 10, 12])  # 10, 12 of 12: the layer keeps Q's complement
def test_complement_init_keeps_kaiming_row_norms_inside_the_complement(k):
    """``init: complement``: row i of A is (A0_i P_Q) |A0_i| / |A0_i P_Q|, A0 = the Kaiming draw of that seed."""
    from preserve_core.methods.fora.bases import ForaBases, RightProjector

    n, m, r = 12, 5, 4
    q = _orthonormal(n, k, 3).float()
    bases = ForaBases(right=RightProjector.smaller_of(q), u1=torch.zeros(m, 0), u_c=torch.zeros(m, 0), v_c=torch.zeros(n, 0))
    torch.manual_seed(7)
    a0 = ForaLinear(torch.nn.Linear(n, m), bases, r=r, alpha=2 * r).lora_A.detach().double()
    torch.manual_seed(7)
    layer = ForaLinear(torch.nn.Linear(n, m), bases, r=r, alpha=2 * r, init="complement")
    qd = q.double()
    free = a0 - a0 @ qd @ qd.T
    expected = free * (a0.norm(dim=1) / free.norm(dim=1)).unsqueeze(1) if k < n else torch.zeros(r, n, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_A.detach().double(), expected, atol=1e-5, rtol=1e-5)
    a_prime, _ = layer.branch_factors()
    torch.testing.assert_close(a_prime.detach().double(), expected, atol=1e-5, rtol=1e-5)  # A' = A at step 0
    if k == 10:
        assert a0.norm() > 1.5 * free.norm()  # what PEFT's init would lose
    if k < n:
        torch.testing.assert_close(layer.lora_A.norm(dim=1).double(), a0.norm(dim=1), rtol=1e-5, atol=0)


def test_task_gradients_equal_autograd_of_the_dense_weight():
    """``G = sum_t g_t x_t^T`` from hooks equals autograd's dL/dW of the same linear (float64, from the definition),
    summed over two batches of a toy model whose loss reads the layer through a nonlinearity."""
    from preserve_core.methods.gradient_init import task_gradients

    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin, self.head = torch.nn.Embedding(9, 6), torch.nn.Linear(6, 4), torch.nn.Linear(4, 9)

        def forward(self, input_ids, labels, use_cache=False):
            logits = self.head(torch.tanh(self.lin(self.emb(input_ids))))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            return SimpleNamespace(loss=loss)

    toy = Toy().double()
    batches = [{"input_ids": torch.randint(0, 9, (3, 5)), "labels": torch.randint(0, 9, (3, 5))} for _ in range(2)]
    batches[1]["labels"][:, :2] = -100  # unlabelled positions, as a prompt's
    toy.requires_grad_(False)
    toy.lin.bias.requires_grad_(True)  # the layer's trainable part (an adapter's factors), as in the LoRA form
    got = dict(task_gradients(toy, {"lin": toy.lin}, batches))["lin"]
    assert toy.lin.bias.grad is None, "the gradients it leaves are cleared"
    toy.lin.weight.requires_grad_(True)
    sum(toy(**b).loss for b in batches).backward()
    torch.testing.assert_close(got.double(), toy.lin.weight.grad, atol=1e-6, rtol=1e-5)
    assert got.abs().max() > 1e-3


@pytest.mark.parametrize(("budget", "passes"), [(None, 1), (4 * 24, 3), (4 * (24 + 16), 2), (10, 3)])
def test_task_gradients_in_groups_under_a_budget_hold_the_same_sums(budget, passes):
    """Three linears of 24, 16 and 36 float32 entries: a budget of 96 bytes (24 entries) runs one group per
    layer, 160 bytes (40) groups the first two, and one below any layer still runs each alone; every layer's
    ``G`` equals autograd's dL/dW (float64, from the definition) whatever the grouping."""
    from preserve_core.methods.gradient_init import layer_groups, task_gradients

    torch.manual_seed(1)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(9, 6)
            self.a, self.b, self.c = torch.nn.Linear(6, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 9)
            self.forwards = 0

        def forward(self, input_ids, labels, use_cache=False):
            self.forwards += 1
            logits = self.c(torch.tanh(self.b(torch.tanh(self.a(self.emb(input_ids))))))
            return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))

    toy = Toy().double()
    batches = [{"input_ids": torch.randint(0, 9, (2, 5)), "labels": torch.randint(0, 9, (2, 5))} for _ in range(2)]
    layers = {"a": toy.a, "b": toy.b, "c": toy.c}
    toy.requires_grad_(False)
    toy.a.bias.requires_grad_(True)
    groups = {None: [["a", "b", "c"]], 96: [["a"], ["b"], ["c"]], 160: [["a", "b"], ["c"]], 10: [["a"], ["b"], ["c"]]}
    assert layer_groups(layers, budget) == groups[budget]
    got = dict(task_gradients(toy, layers, iter(batches), budget))  # a one-shot iterable is read once
    assert toy.forwards == passes * len(batches)
    toy.requires_grad_(True)
    sum(toy(**b).loss for b in batches).backward()
    for name, layer in layers.items():
        torch.testing.assert_close(got[name].double(), layer.weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 10])  # 10 of 12: the layer keeps Q's complement
def test_gradient_init_sets_a_to_the_top_readable_directions_of_the_task_gradient(k):
    """``init: gradient``: A = the top-r right singular vectors of G P (P from Q and the shrink, built as a
    matrix in float64 here) at the mean Kaiming row norm, up to each row's sign; B stays 0 (the layer's
    output is the base's)."""
    from preserve_core.methods.fora.bases import ForaBases, RightProjector

    n, m, r = 12, 7, 3
    q = _orthonormal(n, k, 3)
    empty = {"u1": torch.zeros(m, 0), "u_c": torch.zeros(m, 0), "v_c": torch.zeros(n, 0)}
    bases = ForaBases(right=RightProjector.smaller_of(q.float()), **empty)
    torch.manual_seed(7)
    layer = ForaLinear(torch.nn.Linear(n, m), bases, r=r, alpha=2 * r)
    size = layer.lora_A.detach().double().norm(dim=1).mean()
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer.align_a(g.float())
    _, _, vh = torch.linalg.svd(g @ (torch.eye(n, dtype=torch.float64) - q @ q.T))
    readable = min(r, n - k)  # k = 10: G P has rank 2, the third row lies in Q and A' drops it
    expected = vh[:readable] * size
    got = layer.lora_A.detach().double()
    signs = torch.sign((got[:readable] * expected).sum(dim=1, keepdim=True))
    torch.testing.assert_close(got[:readable] * signs, expected, atol=1e-5, rtol=1e-4)
    assert (got[:readable] @ q).abs().max() < 1e-5, "A starts inside the readable space"
    torch.testing.assert_close(got.norm(dim=1), size.expand(r), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, n)
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("k", [2, 5])  # 5 of 6: the optimizer projects with Q's complement
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_projected_adamw_equals_adam_on_m(weight_decay, k):
    """On ``W = W_0 + P_U M P_Q``, AdamW on ``M`` and the projected AdamW on ``W`` take the same path."""
    torch.set_default_dtype(torch.float64)
    try:
        m, n, steps = 7, 6, 6
        g = torch.Generator().manual_seed(0)
        w0, x, y = torch.randn(m, n, generator=g), torch.randn(n, 10, generator=g), torch.randn(m, 10, generator=g)
        q, u1 = _orthonormal(n, k, 1), _orthonormal(m, 3, 2)

        def loss(w):
            return ((w @ x - y) ** 2).sum() + (w**3).sum()

        def projected(w):
            anchor = {w: w0.clone()}
            return ProjectedAdamW([w], lr=0.05, weight_decay=weight_decay, projectors={w: (q, u1)}, anchors=anchor)

        big_m = torch.zeros(m, n, requires_grad=True)
        reference = torch.optim.AdamW([big_m], lr=0.05, weight_decay=weight_decay)
        w = torch.nn.Parameter(w0.clone())
        ours = projected(w)
        for step in range(steps):
            reference.zero_grad()
            loss(w0 + project_left(project_right(big_m, q), u1)).backward()
            reference.step()
            ours.zero_grad()
            loss(w).backward()
            ours.step()
            if step == 2:  # a state_dict round trip mid-way changes nothing
                saved = ours.state_dict()
                ours = projected(w)
                ours.load_state_dict(saved)
        expected = w0 + project_left(project_right(big_m.detach(), q), u1)
        assert (w.detach() - w0).norm() > 0.1
        torch.testing.assert_close(w.detach(), expected, atol=1e-12, rtol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------------------------
# training with real calibration statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["lora", "full"])
def test_update_obeys_both_projections(form, write_recipe, calibration_settings, tiny_model_dir):
    """After training: ``(dW - channel) Q = 0`` and ``U_1^T (dW - channel) = 0``; ``Q`` spans C_p's top eigenvectors."""
    result = run_recipe(fora_recipe(write_recipe, calibration_settings, f"constraints-{form}", {"form": form}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    method_layers = {name: result.model.get_submodule(name) for name in _targets(result)}
    cal_cov = _preserve_covs(calibration_settings["dir"], method_layers)
    for name, layer in method_layers.items():
        d_w = layer.merged_weight() - base.get_submodule(name).weight.detach()
        v_t, u_delta = layer.channel_factors()
        branch = d_w - u_delta.detach() @ v_t
        assert branch.norm() > 1e-3 and layer.delta.abs().max() > 0, f"{name}: training did not move it"
        assert (branch @ layer.q).norm() / d_w.norm() < 1e-5, name
        assert (layer.u1.T @ branch).norm() / d_w.norm() < 1e-5, name
        assert layer.u1.shape[1] == 4
        cov = cal_cov[name].double()
        top = torch.linalg.eigvalsh(cov).flip(0)
        k = layer.q.shape[1]
        assert k == select_rank(top.clamp_min(0), 0.9, None, 0.5)
        captured = torch.trace(layer.q.double().T @ cov @ layer.q.double())
        torch.testing.assert_close(captured, top[:k].sum(), rtol=1e-5, atol=1e-6)


def _targets(result) -> list[str]:
    return [name for name, module in result.model.named_modules() if isinstance(module, ForaLinear)]


def _preserve_covs(directory, names) -> dict[str, torch.Tensor]:
    from preserve_core.calibration.store import Calibration, read_manifest

    cal = Calibration(directory, read_manifest(directory))
    return {name: cal.preserve_cov(name) for name in names}


def test_lora_form_exports_loadable_adapter_and_merged_model(write_recipe, calibration_settings, tiny_model_dir):
    recipe = fora_recipe(write_recipe, calibration_settings, "export-lora", {"r": 4, "alpha": 8}, max_steps=4)
    result = train(load_recipe(recipe, ["output.merge=true"]), show_progress=False)
    expected = logits(result.model)
    before = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert not torch.allclose(before, expected, atol=1e-4), "training changed nothing"
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in adapter.items() if "lora_A" in k} == {4 + 2}  # rank r + s
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.final_dir)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged")
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_full_form_exports_merged_model(write_recipe, calibration_settings, tiny_model_dir):
    method = {"form": "full"}
    recipe = fora_recipe(write_recipe, calibration_settings, "export-full", method, max_steps=4, weight_decay=0.1)
    result = run_recipe(recipe)
    expected = logits(result.model)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), expected, atol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".base.weight") or n.endswith(".delta") for n in trainable)


def test_full_form_exports_an_exact_adapter_of_rank_n_minus_k(write_recipe, calibration_settings, tiny_model_dir):
    """export_adapter: the adapter's B A equals W_trained - W_0 (both read from model files, float64), its
    A has orthonormal rows spanning the complement of Q (A Q = 0), and each layer's rank is n - k."""
    from preserve_core.methods.fora.bases import input_projector

    method = {"form": "full", "export_adapter": True, "u_rank": 0, "spectral_size": 0}
    path = fora_recipe(write_recipe, calibration_settings, "export-adapter", method, max_steps=4)
    recipe = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**recipe, "output": {**recipe["output"], "merge": True}}))
    result = run_recipe(path)
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    covs = _preserve_covs(calibration_settings["dir"], _targets(result))
    for name in _targets(result):
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        delta = result.model.get_submodule(name).base.weight.detach().double() - base.get_submodule(name).weight.double()
        assert delta.abs().max() > 1e-3, f"{name}: training did not move W"
        torch.testing.assert_close(b @ a, delta, atol=1e-6, rtol=0, msg=name)
        k = input_projector(covs[name].double(), SimpleNamespace(energy=0.9, rank=None, max_rank=0.5)).rank
        assert a.shape[0] == a.shape[1] - k, name
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged")  # output.merge: both
    torch.testing.assert_close(logits(merged), logits(result.model), atol=1e-5, rtol=1e-5)
    reloaded = PeftModel.from_pretrained(base, result.final_dir)
    torch.testing.assert_close(logits(reloaded), logits(result.model), atol=1e-5, rtol=1e-5)


def test_export_rank_keeps_the_top_singular_directions_inside_the_complement(
    write_recipe, calibration_settings, tiny_model_dir
):
    """export_rank 3: B A is the best rank-3 approximation of W_trained - W_0 (float64 SVD of the
    difference read from the model files), A Q = 0, the reported error is the SVD's tail, and stock PEFT
    loads it."""
    import json

    from preserve_core.methods.fora.bases import input_projector

    method = {"form": "full", "export_adapter": True, "export_rank": 3, "u_rank": 0, "spectral_size": 0}
    result = run_recipe(fora_recipe(write_recipe, calibration_settings, "export-rank", method, max_steps=4))
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    report = json.loads((result.final_dir / "export_truncation.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    covs = _preserve_covs(calibration_settings["dir"], _targets(result))
    for name in _targets(result):
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        tuned = result.model.get_submodule(name).base.weight.detach().double()
        delta = tuned - base.get_submodule(name).weight.detach().double()
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        assert a.shape[0] == 3 and sv[3] > 1e-3 * sv[0], f"{name}: the cut must drop real directions"
        torch.testing.assert_close(b @ a, (u[:, :3] * sv[:3]) @ vh[:3], atol=1e-6, rtol=0, msg=name)
        q = input_projector(covs[name].double(), SimpleNamespace(energy=0.9, rank=None, max_rank=0.5)).protected()
        assert (a @ q.double()).abs().max() < 1e-5, name
        tail = float((sv[3:] ** 2).sum() / (sv**2).sum()) ** 0.5
        assert report["relative_error"][name] == pytest.approx(tail, rel=1e-4), name
    assert report["export_rank"] == 3 and report["max_relative_error"] == max(report["relative_error"].values())
    PeftModel.from_pretrained(base, result.final_dir)


def test_export_rank_needs_export_adapter(write_recipe, calibration_settings):
    from preserve_core.errors import RecipeError

    with pytest.raises(RecipeError, match="export_rank truncates the adapter"):
        load_recipe(fora_recipe(write_recipe, calibration_settings, "bad-rank", {"form": "full", "export_rank": 4}))


def test_adapter_export_with_every_direction_protected_is_a_zero_rank_one_adapter(write_recipe, calibration_settings):
    """k = n leaves no free direction: W does not move and each layer exports A [1, n] = 0, B [m, 1] = 0."""
    method = {"form": "full", "export_adapter": True, "rank": 10**6, "u_rank": 0, "spectral_size": 0}
    result = run_recipe(fora_recipe(write_recipe, calibration_settings, "export-none-free", method, max_steps=2))
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    for name in _targets(result):
        a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 1 and not a.any() and not b.any(), name


def test_adapter_export_needs_the_full_form_and_a_fixed_q(write_recipe, calibration_settings):
    from preserve_core.errors import RecipeError

    for method in ({"form": "lora", "export_adapter": True}, {"form": "full", "export_adapter": True, "refresh_every": 2}):
        with pytest.raises(RecipeError, match="export_adapter is for form: full with a fixed Q"):
            load_recipe(fora_recipe(write_recipe, calibration_settings, "bad", method))


def test_gradient_init_runs_once_at_set_up_on_the_first_rows_and_not_on_resume(
    write_recipe, calibration_settings, monkeypatch
):
    """init_rows 10 at batch size 4: the engine hands batches of 4, 4, 2 rows before the first step, and a
    resumed run does not (its A comes from the checkpoint: resume is exact); a memory budget that takes the
    layers' G one at a time ends bit for bit where one pass does; form: full refuses init."""
    from preserve_core.errors import RecipeError
    from preserve_core.methods.fora.method import Fora

    seen: list[list[int]] = []
    original = Fora.init_from_data

    def spy(self, model, batches):
        batches = list(batches)
        seen.append([len(b["input_ids"]) for b in batches])
        assert all(p.grad is None for p in model.parameters()), "before any step"
        return original(self, model, batches)

    monkeypatch.setattr(Fora, "init_from_data", spy)
    method = {"init": "gradient", "init_rows": 10, "dropout": 0.1}
    common = {"max_steps": 6, "save_every": 3, "keep_last": 5, "batch_size": 4}
    straight = run_recipe(fora_recipe(write_recipe, calibration_settings, "gi-straight", method, **common))
    assert seen == [[4, 4, 2]]
    interrupted = fora_recipe(write_recipe, calibration_settings, "gi-resumed", method, **common)
    first = run_recipe(interrupted)
    shutil.rmtree(first.run_dir / "final")
    shutil.rmtree(list_checkpoints(first.run_dir)[-1])
    resumed = run_recipe(interrupted, resume=True)
    assert seen == [[4, 4, 2]] * 2, "not again on resume"
    a, b = (load_file(next(r.final_dir.glob("*.safetensors"))) for r in (straight, resumed))
    assert_same_tensors(a, b, atol=1e-6)
    budgeted = dict(calibration_settings, stats_memory_gb=1e-9)  # every layer's G alone: 28 passes
    grouped = run_recipe(fora_recipe(write_recipe, budgeted, "gi-grouped", method, **common))
    assert seen[-1] == [4, 4, 2]
    c = load_file(next(grouped.final_dir.glob("*.safetensors")))
    assert_same_tensors(a, c, atol=0)
    with pytest.raises(RecipeError, match="init: gradient sets the LoRA form's A; form: full has none"):
        load_recipe(fora_recipe(write_recipe, calibration_settings, "gi-full", {"form": "full", "init": "gradient"}))


@pytest.mark.parametrize(
    "method",
    [{"name": "fora", "dropout": 0.1}, {"name": "weightproj", "form": "full"},
     {"name": "fora", "form": "full", "refresh_every": 3, "refresh_samples": 8}],
)  # fmt: skip
def test_resume_is_exact(method, write_recipe, calibration_settings):
    """5 steps, stop, resume for 5 more == 10 straight (LoRA form with dropout; full form with weight decay)."""
    label = method["name"]
    common = {"max_steps": 10, "save_every": 5, "keep_last": 5, "warmup_steps": 2, "grad_accum": 2}
    common["weight_decay"] = 0.05
    straight = run_recipe(fora_recipe(write_recipe, calibration_settings, f"straight-{label}", method, **common))
    interrupted = fora_recipe(write_recipe, calibration_settings, f"resumed-{label}", method, **common)
    first = run_recipe(interrupted)
    shutil.rmtree(first.run_dir / "final")
    shutil.rmtree(list_checkpoints(first.run_dir)[-1])
    assert list_checkpoints(first.run_dir)[-1].name == "checkpoint-000005"
    keys = load_file(list_checkpoints(first.run_dir)[-1] / "method.safetensors").keys()
    if method.get("refresh_every"):  # the Q refreshed at step 3 is state: checkpointed with the hash
        assert "bases_sha256" in keys and any(k.startswith("refreshed/") for k in keys)
    else:
        assert keys == {"bases_sha256"}
    resumed = run_recipe(interrupted, resume=True)
    torch.testing.assert_close(logits(resumed.model), logits(straight.model), atol=1e-6, rtol=0)
    a, b = (load_file(next(r.final_dir.glob("*.safetensors"))) for r in (straight, resumed))
    assert_same_tensors(a, b, atol=1e-6)


def test_refresh_recomputes_q_on_the_current_model_and_later_steps_obey_it(write_recipe, calibration_settings):
    """refresh_every 3 of 6 steps: the final Q spans the top-k eigenvectors of C_p measured (float64, by
    hand) on the step-3 model's activations of the first 8 preserve sequences; steps 4-6 satisfy
    ``(W_6 - W_3) Q_new = 0`` while ``W_3 - W_0`` does not (it obeyed the calibration Q)."""
    from preserve_core.calibration.batches import preserve_batches
    from preserve_core.calibration.store import Calibration, read_manifest

    method = {"form": "full", "refresh_every": 3, "refresh_samples": 8, "u_rank": 0, "spectral_size": 0}
    recipe = fora_recipe(write_recipe, calibration_settings, "refresh", method, save_every=3, keep_last=3)
    result = run_recipe(recipe)
    step3 = load_file(list_checkpoints(result.run_dir)[0] / "trainable.safetensors")
    model = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float64)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = AutoModelForCausalLM.from_pretrained(load_recipe(recipe).model.name_or_path, dtype=torch.float64)
    w0 = {n: p.detach() for n, p in base.named_parameters()}
    for name, value in step3.items():  # the model at step 3 (trainable names end in .base.weight)
        model.get_submodule(name.removesuffix(".base.weight")).weight.data.copy_(value.double())
    cal = Calibration(calibration_settings["dir"], read_manifest(calibration_settings["dir"]))
    tokenizer = load_tokenizer_for(recipe)
    batches = preserve_batches(cal.preserve_sequences(tokenizer, 32)[:8], tokenizer, 32, 16)
    layers = {n: m for n, m in result.model.named_modules() if isinstance(m, ForaLinear)}
    inputs = {n: [] for n in layers}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in layers]
    with torch.no_grad():
        for batch in batches:
            inputs_mask = batch["attention_mask"].bool()
            before = {n: len(v) for n, v in inputs.items()}
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for n in layers:
                inputs[n][before[n]] = inputs[n][before[n]][inputs_mask]
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        x = torch.cat(inputs[name])
        values, vectors = torch.linalg.eigh(x.T @ x / x.shape[0])
        k = layer.q.shape[1]
        assert k == select_rank(values.flip(0).clamp_min(0), 0.9, None, 0.5)
        top = vectors.flip(1)[:, :k]
        q = layer.q.double()
        torch.testing.assert_close(q @ q.T, top @ top.T, atol=2e-4, rtol=0)
        key = f"{name}.weight"
        late = final[key] - step3[f"{name}.base.weight"].double()
        early = step3[f"{name}.base.weight"].double() - w0[key]
        assert late.norm() > 1e-3 and (late @ q).norm() / late.norm() < 1e-5, name
        assert (early @ q).norm() / early.norm() > 1e-3, f"{name}: the refresh did not change Q"


def load_tokenizer_for(recipe_path):
    from preserve_core.models import load_tokenizer

    return load_tokenizer(load_recipe(recipe_path).model)


def test_refresh_needs_the_full_form(write_recipe, calibration_settings):
    from preserve_core.errors import RecipeError

    with pytest.raises(RecipeError, match="form: full"):
        load_recipe(fora_recipe(write_recipe, calibration_settings, "bad", {"form": "lora", "refresh_every": 2}))


@pytest.mark.parametrize("method", [{"name": "weightproj"}, {"name": "fora", "source": "weight"}])
def test_weightproj_needs_no_calibration_and_protects_weight_directions(write_recipe, tiny_model_dir, method):
    result = run_recipe(write_recipe("weightproj", method={**method, "rank": 3, "u_rank": 0, "spectral_size": 0},
                              training={"max_steps": 3, "lr": 2e-2}))  # fmt: skip
    assert not (result.run_dir / "calibration").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for name in _targets(result):
        layer = result.model.get_submodule(name)
        w0 = base.get_submodule(name).weight.detach()
        top_right = torch.linalg.svd(w0.double())[2][:3].T.float()
        torch.testing.assert_close(layer.q @ layer.q.T, top_right @ top_right.T, atol=1e-5, rtol=0)
        d_w = layer.merged_weight() - w0
        assert d_w.norm() > 1e-4 and (d_w @ top_right).norm() / d_w.norm() < 1e-5


# ---------------------------------------------------------------------------------------------
# set-up memory: one basis per input, the smaller side, no unused SVD, no bases in checkpoints
# ---------------------------------------------------------------------------------------------


def _cov_with_spectrum(values: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = E diag(values) E^T`` (float64) with a random orthonormal ``E``; returns ``(C, E)``."""
    e = _orthonormal(len(values), len(values), seed)
    return e @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ e.T, e


@pytest.mark.parametrize("solver", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank, complement", [(3, False), (5, False), (7, True)])
def test_input_projector_keeps_the_smaller_side_and_equals_the_float64_projection(rank, complement, solver):
    from types import SimpleNamespace

    from preserve_core.methods.fora.bases import input_projector

    values = [10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25]  # distinct: the top-k span is unique
    cov, e = _cov_with_spectrum(values, 3)
    options = SimpleNamespace(energy=0.95, rank=rank, max_rank=1.0)
    projector = input_projector(torch.triu(cov).to(solver), options)  # only the upper triangle is read
    assert projector.complement is complement and projector.rank == rank
    assert projector.vectors.shape == (10, min(rank, 10 - rank)) and projector.vectors.dtype == torch.float32
    x = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = e[:, :rank]  # float64 reference: the eigenvectors of the `rank` largest eigenvalues
    expected = x - (x @ q) @ q.T
    tol = 2e-6 if solver == torch.float64 else 1e-5
    torch.testing.assert_close(projector(x.float()).double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(projector.protected().double() @ projector.protected().double().T, q @ q.T,
                               atol=tol, rtol=0)  # fmt: skip


def _fora_on_tiny(tiny_model_dir, options: dict, covs: dict[str, torch.Tensor] | None = None):
    """``(method, model)``: FORA prepared on the tiny model with a stand-in calibration (C_p per input)."""
    from types import SimpleNamespace

    from preserve_core.calibration.layout import discover_layout
    from preserve_core.methods.fora import Fora, ForaOptions
    from preserve_core.models import resolve_target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    targets = resolve_target_modules(model, None)
    layout = discover_layout(model, targets, torch.device("cpu"))
    dims = {layout.module_to_key[n]: model.get_submodule(n).in_features for n in targets}
    covs = covs or {k: _cov_with_spectrum([float(n - i) for i in range(n)], 7)[0].float() for k, n in dims.items()}
    calibration = SimpleNamespace(input_key=layout.module_to_key.__getitem__,
                                  upper_triangle=lambda which, key, dtype, device: torch.triu(covs[key]).to(dtype))  # fmt: skip
    recipe = SimpleNamespace(training=SimpleNamespace(decay=0.0))
    ctx = SimpleNamespace(recipe=recipe, target_modules=targets, device=torch.device("cpu"), calibration=calibration)
    method = Fora(ForaOptions(**options), ctx)
    return method, method.prepare_model(model)


def test_no_weight_svd_without_u1_and_channel_and_one_shared_basis_per_input(tiny_model_dir, monkeypatch):
    from preserve_core.methods.fora import bases as fora_bases

    calls = []
    real_svd = fora_bases.weight_svd
    monkeypatch.setattr(fora_bases, "weight_svd", lambda w: calls.append(w.shape) or real_svd(w))
    method, _ = _fora_on_tiny(tiny_model_dir, {"form": "lora", "u_rank": 0, "spectral_size": 0})
    assert calls == []
    layers = method.layers
    assert all(layer.u1.shape[1] == 0 and layer.delta is None for layer in layers.values())
    attn = [layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    mlp = [layers[f"model.layers.0.mlp.{p}_proj"] for p in ("gate", "up")]
    for group in (attn, mlp):
        assert len({layer.right.data_ptr() for layer in group}) == 1  # one tensor per distinct input
    assert attn[0].right.data_ptr() != mlp[0].right.data_ptr()
    _fora_on_tiny(tiny_model_dir, {"form": "lora", "u_rank": 0, "spectral_size": 2})
    assert len(calls) == len(layers)  # the channel needs the SVD: once per layer


def test_checkpoint_holds_a_hash_not_the_bases(tiny_model_dir):
    from preserve_core.errors import PPFTError

    method, _ = _fora_on_tiny(tiny_model_dir, {"form": "lora", "u_rank": 2, "spectral_size": 2})
    state = method.state_dict()
    assert list(state) == ["bases_sha256"] and state["bases_sha256"].numel() == 32
    again, _ = _fora_on_tiny(tiny_model_dir, {"form": "lora", "u_rank": 2, "spectral_size": 2})
    again.load_state_dict(state)  # the same recomputation: accepted
    other, _ = _fora_on_tiny(tiny_model_dir, {"form": "lora", "u_rank": 3, "spectral_size": 2})
    with pytest.raises(PPFTError, match="differ from those the checkpoint"):
        other.load_state_dict(state)


def test_bf16_full_form_keeps_float32_masters_resumes_exactly_and_leaks_one_rounding(
    write_recipe, calibration_settings, tiny_model_dir, capsys
):
    """``model.dtype: bfloat16``, full form: 3 steps, stop, resume for 3 more == 6 straight, bit for bit
    (the float32 masters ``W~`` travel in the checkpoint); ``(W~_6 - W_0) Q = 0`` to float32 rounding,
    ``W_6 = bf16(W~_6)``, so ``||(W_6 - W_0) Q|| <= 2^-8 ||W~_6||``: one rounding, not accumulated."""
    from preserve_core.checkpoint import _read_state

    method = {"name": "fora", "form": "full", "energy": 0.9, "max_rank": 0.5, "u_rank": 0, "spectral_size": 0}
    common = {"max_steps": 6, "save_every": 3, "keep_last": 3, "weight_decay": 0.05, "lr": 2e-2, "schedule": "constant"}

    def recipe(name):
        return write_recipe(name, model={"dtype": "bfloat16"}, method=method, training=common, calibration=calibration_settings)

    straight = run_recipe(recipe("bf16-straight"))
    assert "float32 master copy" in capsys.readouterr().err  # the user is told, with the exact alternative
    first = run_recipe(recipe("bf16-resumed"))
    shutil.rmtree(first.run_dir / "final")
    shutil.rmtree(list_checkpoints(first.run_dir)[-1])
    resumed = run_recipe(recipe("bf16-resumed"), resume=True)
    trainable = [n.removesuffix(".base.weight") for n, p in straight.model.named_parameters() if p.requires_grad]
    state = _read_state(list_checkpoints(straight.run_dir)[-1] / "state.pt")["optimizer"]["state"]
    masters = {name: state[i]["master"] for i, name in enumerate(trainable)}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert set(masters) == set(_targets(straight))
    for name, master in masters.items():
        layer, w0 = straight.model.get_submodule(name), base.get_submodule(name).weight.detach().double()
        w, q = layer.base.weight.detach(), layer.q.double()
        assert master.dtype == torch.float32 and w.dtype == torch.bfloat16
        assert torch.equal(w, master.bfloat16()) and torch.equal(w, resumed.model.get_submodule(name).base.weight.detach())
        exact = master.double() - w0
        assert exact.norm() > 1e-2 and (exact @ q).norm() < 1e-5 * exact.norm(), name
        assert ((w.double() - w0) @ q).norm() <= 2.0**-8 * master.double().norm(), name


# ---------------------------------------------------------------------------------------------
# residual_shrink: the soft half of P_Q (ours)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [torch.float64, torch.float32])
def test_residual_shrink_keeps_each_unprotected_direction_at_its_hand_computed_length(solver):
    """C_p = E diag(lambda) E^T: P maps the k protected e_i to 0 and every other e_i to s_i e_i with
    s_i = (1 + strength * lambda_i / mean(lambda))^(-1/2) written out by hand; lambda = 0 stays whole."""
    from types import SimpleNamespace

    from preserve_core.methods.fora.bases import input_projector

    values = [40.0, 20.0, 10.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0, 0.0]  # mean 7.76
    cov, e = _cov_with_spectrum(values, 11)
    projector = input_projector(torch.triu(cov).to(solver), SimpleNamespace(energy=0.9, rank=3, max_rank=1.0,
                                                                             residual_shrink=7.76))  # fmt: skip
    # strength = mean(lambda): s_i = (1 + lambda_i)^(-1/2)
    kept = [0.0, 0.0, 0.0, 5 ** -0.5, 3 ** -0.5, 2 ** -0.5, 1.5 ** -0.5, 1.1 ** -0.5, 1.0, 1.0]
    out = projector(e.T.float()).double()  # row i: P applied to e_i
    tol = 2e-6 if solver == torch.float64 else 2e-5
    torch.testing.assert_close(out, torch.diag(torch.tensor(kept, dtype=torch.float64)) @ e.T, atol=tol, rtol=0)
    assert projector.shrink_vectors.shape == (10, 5)  # the zero eigenvalues are left out (nothing to shrink)
    plain = input_projector(torch.triu(cov).to(solver), SimpleNamespace(energy=0.9, rank=3, max_rank=1.0))
    assert plain.shrink_vectors is None  # off by default: the spec's hard projector


def test_residual_shrink_reaches_the_lora_branch_the_export_and_the_checkpoint_hash(tiny_model_dir):
    """A' = A P with P = I - Q Q^T - sum_i (1 - s_i) v_i v_i^T from a float64 eigendecomposition of the
    layer's C_p; the full form's optimizer is handed the same P; a checkpoint made without the shrink is
    refused (its bases differ)."""
    from preserve_core.errors import PPFTError

    options = {"form": "lora", "u_rank": 0, "spectral_size": 0, "energy": 0.5, "max_rank": 0.99}
    method, _ = _fora_on_tiny(tiny_model_dir, {**options, "residual_shrink": 30.0})
    layer = method.layers["model.layers.0.mlp.down_proj"]
    n = layer.in_features
    values = torch.tensor([float(n - i) for i in range(n)], dtype=torch.float64)  # _fora_on_tiny's spectrum
    e = _cov_with_spectrum(values.tolist(), 7)[1]
    k = int((values.cumsum(0) / values.sum() < 0.5).sum()) + 1
    s = (1 + 30.0 * values / values.mean()).rsqrt()
    s[:k] = 0
    expected = layer.lora_A.detach().double() @ (e @ torch.diag(s) @ e.T)
    torch.testing.assert_close(layer.branch_factors()[0].detach().double(), expected, atol=2e-5, rtol=0)
    a, _ = layer.update_factors()  # what the PEFT export writes as lora_A
    torch.testing.assert_close(a.double(), expected, atol=2e-5, rtol=0)
    plain, _ = _fora_on_tiny(tiny_model_dir, options)
    with pytest.raises(PPFTError, match="differ from those the checkpoint"):
        method.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("bad", [{"source": "weight"}, {"form": "full", "refresh_every": 2}])
def test_residual_shrink_needs_activation_eigenvalues_and_a_fixed_q(bad, write_recipe, calibration_settings):
    from preserve_core.errors import RecipeError

    with pytest.raises(RecipeError, match="residual_shrink reads the eigenvalues of C_p"):
        load_recipe(fora_recipe(write_recipe, calibration_settings, "bad", {"residual_shrink": 10.0, **bad}))
