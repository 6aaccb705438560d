"""Shared fixtures: a tiny random Llama with a character tokenizer, tiny data sets, recipe writers.

Nothing here downloads anything; everything is built in a temporary folder.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
import yaml

CHARS = string.ascii_lowercase + string.digits + " =+:,.>\n"


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with bos/eos/pad/unk, built with ``tokenizers``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 32) and its character tokenizer."""
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: on tiny matrices a second thread only adds contention
    (badly so on a busy machine). Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reverse_examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (1,), generator=g))
        word = "".join(string.ascii_lowercase[int(i)] for i in torch.randint(0, 26, (length,), generator=g))
        rows.append({"prompt": f"rev:{word}=", "completion": word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_task_file(tmp_path_factory) -> Path:
    """64 prompt/completion rows of a string-reversal task."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "task.jsonl", reverse_examples(64))


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir, tiny_task_file):
    """``write_recipe(**sections) -> Path``: a recipe on the tiny model and task; sections override defaults."""

    def write(name: str = "recipe", **sections) -> Path:
        recipe = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(tiny_task_file), "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "training": {"lr": 1e-2, "max_steps": 6, "batch_size": 8, "log_every": 1, "seed": 0},
            "output": {"dir": str(tmp_path / f"run-{name}")},
        }
        for key, value in sections.items():
            recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) and key != "method" else value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def at_step(monkeypatch, step: int, action) -> object:
    """Call ``action()`` (raise ``KeyboardInterrupt``, send a signal) as optimizer step ``step`` begins,
    by wrapping ``TrainingLoop.one_step`` for the test; returns the unwrapped ``one_step`` (to put back
    before resuming)."""
    from preserve_core import training

    original = training.TrainingLoop.one_step
    calls = {"n": 0}

    def one_step(self):
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return original(self)

    monkeypatch.setattr(training.TrainingLoop, "one_step", one_step)
    return original


def raise_keyboard_interrupt() -> None:
    """Ctrl-C as the interrupted code sees it."""
    raise KeyboardInterrupt


def rewind_to_previous_checkpoint(run_dir: Path) -> Path:
    """Make a finished run look stopped just after its next-to-last checkpoint (``final/`` and the
    newest checkpoint removed); returns the checkpoint ``--resume`` will start from."""
    import shutil

    from preserve_core.checkpoint import list_checkpoints

    shutil.rmtree(run_dir / "final")
    shutil.rmtree(list_checkpoints(run_dir)[-1])
    return list_checkpoints(run_dir)[-1]


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    """Two ``{name: tensor}`` dicts hold the same names and, name by name, the same values to ``atol``."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def assert_same_final_adapter(run_a: Path, run_b: Path, atol: float) -> None:
    """The two runs' final PEFT adapters hold the same tensors, to ``atol``."""
    from safetensors.torch import load_file

    adapter = "final/adapter_model.safetensors"
    assert_same_tensors(load_file(run_a / adapter), load_file(run_b / adapter), atol)


def run_recipe(path: Path, resume: bool = False):
    """``train`` on the recipe at ``path``, without a progress bar; returns its ``TrainResult``."""
    from preserve_core.recipe import load_recipe
    from preserve_core.training import train

    return train(load_recipe(path), resume=resume, show_progress=False)


# Stand-in calibration, for tests of methods and regularisers that read one.
PRESERVE_TEXTS = [f"the {w} is {c} and {n} = {n}" for w, c, n in zip("abcdefghijkl", "mnopqrstuvwx", range(12))]
SMALL_CALIBRATION = {"num_samples": 12, "max_new_tokens": 12, "batch_size": 12, "stats_batch_size": 8, "fisher_samples": 8}


def random_cov(n: int, seed: int) -> torch.Tensor:
    """A seeded full-rank ``[n, n]`` covariance ``X^T X / 4n`` with column scales 0.1..2."""
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 2, n)
    return x.T @ x / (4 * n)


def fake_calibration(model: torch.nn.Module, extras: dict | None = None):
    """In place of a computed calibration: preserve texts, method extras, and a random full-rank C_p
    (seeded by layer width)."""
    from types import SimpleNamespace

    def preserve_cov(name: str) -> torch.Tensor:
        width = model.get_submodule(name).in_features
        return random_cov(width, width)

    def upper_triangle(which: str, key: str, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """What FORA reads (its layers' keys are their names here): C_p's upper triangle."""
        return torch.triu(preserve_cov(key)).to(device=device, dtype=dtype)

    return SimpleNamespace(preserve_texts=PRESERVE_TEXTS, extra=lambda key: extras[key], preserve_cov=preserve_cov,
                           upper_triangle=upper_triangle)  # fmt: skip


def stand_in_context(recipe, tokenizer, model, calibration):
    """The ``MethodContext`` (CPU, the recipe's target modules of ``model``) a method is built with."""
    from preserve_core.methods import MethodContext
    from preserve_core.models import resolve_target_modules

    targets = resolve_target_modules(model, recipe.model.target_modules)
    return MethodContext(recipe, tokenizer, targets, torch.device("cpu"), calibration=calibration)


def calibrated_recipe(write_recipe, tmp_path: Path, name: str, method: dict, **training) -> Path:
    """A recipe on a real but small calibration, in one folder shared by the test's recipes (sampled
    once, extras added per method)."""
    calibration = {**SMALL_CALIBRATION, "dir": str(tmp_path / "calibration")}
    return write_recipe(name, method=method, calibration=calibration, training={"max_steps": 3, "lr": 1e-2, **training})
