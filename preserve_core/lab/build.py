"""Building and locating the lab: data sets, the pretrained model and its card, cached under ``lab_home()``.

Layout of one build (``lab_home()/<size>-s<seed>-<hash>/``)::

    model/                 save_pretrained safetensors + tokenizer (AutoModelForCausalLM / AutoTokenizer)
    card.json, card.md     config, build time, per-skill exact match of the pretrained model
The data sets live apart (``lab_home()/data-<hash>/<skill>/{train,eval}.jsonl`` and
``preserve_mix/train.jsonl``): they need no model, so ``data: lab:<skill>`` never triggers training.
Builds are atomic (a temporary folder renamed into place) and idempotent (a matching key is reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import RecipeError
from ..locks import exclusive_lock
from .config import LAB_VERSION, PRESETS, LabConfig
from .skills import NEW_SKILLS, PRETRAIN_SKILLS, SKILLS, split_examples

EVAL_MAX_NEW_TOKENS = 16


def lab_home() -> Path:
    """``$PPFT_HOME/lab``, or ``~/.cache/ppft/lab`` (``$XDG_CACHE_HOME`` respected)."""
    root = os.environ.get("PPFT_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppft"
    return Path(root) / "lab"


def preset(size: str) -> LabConfig:
    if size not in PRESETS:
        raise RecipeError(f"unknown lab size '{size}'. Available: {', '.join(PRESETS)}.")
    return PRESETS[size]


def data_dir(cfg: LabConfig, seed: int = 0) -> Path:
    blob = json.dumps([cfg.n_train, cfg.n_eval, cfg.n_preserve_mix, seed, LAB_VERSION]).encode()
    return lab_home() / f"data-{hashlib.sha256(blob).hexdigest()[:10]}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ensure_data(cfg: LabConfig, seed: int = 0) -> Path:
    """Write (once) every skill's train/eval JSONL and the label-free ``preserve_mix``; returns the folder.

    A folder written before a new task was added gets that task's files added in place (the other
    skills' files, identical by construction, are left as they are)."""
    final = data_dir(cfg, seed)
    if (final / "done").exists():
        for skill in SKILLS:
            if not (final / skill / "eval.jsonl").exists():
                add_skill_data(final, skill, cfg, seed)
        return final
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for skill in SKILLS:
        train, evals = split_examples(skill, cfg.n_train, cfg.n_eval, seed)
        _write_jsonl(tmp / skill / "train.jsonl", train)
        _write_jsonl(tmp / skill / "eval.jsonl", evals)
    mix = [r for s in PRETRAIN_SKILLS for r in split_examples(s, cfg.n_preserve_mix // len(PRETRAIN_SKILLS), 1, seed + 1)[0]]
    _write_jsonl(tmp / "preserve_mix" / "train.jsonl", [{"text": r["prompt"] + r["completion"]} for r in mix])
    write_preserve_mix_eval(tmp)
    (tmp / "done").write_text("ok\n")
    _move_into_place(tmp, final)
    return final


def add_skill_data(folder: Path, skill: str, cfg: LabConfig, seed: int) -> None:
    """Write one skill's ``train.jsonl`` / ``eval.jsonl`` into an existing data folder (atomic: a
    temporary folder renamed into place; a concurrent writer's identical copy wins)."""
    train, evals = split_examples(skill, cfg.n_train, cfg.n_eval, seed)
    tmp = folder / f".tmp-{skill}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_jsonl(tmp / "train.jsonl", train)
    _write_jsonl(tmp / "eval.jsonl", evals)
    _move_into_place(tmp, folder / skill)


def write_preserve_mix_eval(folder: Path) -> Path:
    """``preserve_mix/eval.jsonl``: the pretraining skills' eval rows as ``text``, interleaved (for KL/perplexity)."""
    path = folder / "preserve_mix" / "eval.jsonl"
    if not path.exists():
        per_skill = [[json.loads(x) for x in (folder / s / "eval.jsonl").read_text().splitlines()] for s in PRETRAIN_SKILLS]
        rows = [{"text": r["prompt"] + r["completion"]} for group in zip(*per_skill, strict=False) for r in group]
        tmp = path.with_name(f".eval.{os.getpid()}.tmp")
        _write_jsonl(tmp, rows)
        tmp.replace(path)
    return path


def eval_prompts(cfg: LabConfig, seed: int = 0) -> set[str]:
    """Held-out prompts the pretraining stream must not show (memorised facts excepted)."""
    folder = ensure_data(cfg, seed)
    return {
        json.loads(line)["prompt"]
        for s in PRETRAIN_SKILLS
        if s != "recall"
        for line in (folder / s / "eval.jsonl").read_text().splitlines()
    }


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; if another process got there first, keep theirs."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_path(size: str, seed: int = 0) -> Path:
    return lab_home() / preset(size).key(seed)


def is_built(size: str, seed: int = 0) -> bool:
    return (build_path(size, seed) / "card.json").exists()


def build_lab(size: str = "tiny", seed: int = 0, force: bool = False, on_step: Callable[[int, int, float], None] | None = None) -> Path:
    """Pretrain (or reuse) the lab model of ``size``; returns the build folder. ``on_step(step, total, loss)``."""
    cfg, final = preset(size), build_path(size, seed)
    if (final / "card.json").exists() and not force:
        return upgrade_tokenizer(final)
    with build_lock(final):  # other processes (ranks of one launch, parallel runs) wait for this build
        if (final / "card.json").exists() and not force:
            return upgrade_tokenizer(final)
        return _build(cfg, seed, final, force, on_step)


def upgrade_tokenizer(final: Path) -> Path:
    """Give a cached build made before the BOS post-processor the current tokenizer; weights stay.

    The model never changes: only ``tokenizer.json`` / ``tokenizer_config.json`` are rewritten, each
    replaced by an atomic rename, under the build lock. Returns ``final``.
    """
    from .tokenizer import adds_bos, build_tokenizer

    model_dir = final / "model"
    if adds_bos(model_dir):
        return final
    with build_lock(final):
        if adds_bos(model_dir):
            return final
        tmp = final / f".tmp-tokenizer-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tokenizer().save_pretrained(tmp)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):  # the one adds_bos reads: last
            path.replace(model_dir / path.name)
        tmp.rmdir()
    return final


def build_lock(final: Path):
    """An exclusive ``flock`` on ``<final>.lock`` for the duration of a build (says so when it must wait)."""
    return exclusive_lock(final)


def _build(cfg: LabConfig, seed: int, final: Path, force: bool, on_step) -> Path:
    from ..models import quiet_transformers
    from .pretrain import build_model, pretrain
    from .tokenizer import build_tokenizer

    quiet_transformers()
    folder = ensure_data(cfg, 0)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    model = build_model(cfg, len(tokenizer), seed)
    stats = pretrain(model, tokenizer, cfg, seed, device, eval_prompts(cfg), lambda s, loss: on_step and on_step(s, cfg.steps, loss))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.cpu().save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    card = make_card(cfg, seed, model, tokenizer, folder, stats)
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "card.md").write_text(card_markdown(card))
    if force and final.exists():
        shutil.rmtree(final)
    _move_into_place(tmp, final)
    return final


def skill_accuracy(model, tokenizer, data_folder: Path, skills: list[str], batch_size: int = 128) -> dict[str, float]:
    """Greedy exact match of ``model`` on each skill's eval split."""
    from ..evaluation import evaluate_suite
    from ..recipe_schema import EvalTask

    tasks = [
        EvalTask(name=s, kind="exact_match", data=str(data_folder / s / "eval.jsonl"), max_new_tokens=EVAL_MAX_NEW_TOKENS)
        for s in skills
    ]
    return {name: r.score for name, r in evaluate_suite(model, tokenizer, tasks, batch_size).items()}


def make_card(cfg: LabConfig, seed: int, model, tokenizer, data_folder: Path, stats: dict) -> dict:
    import transformers

    accuracy = skill_accuracy(model, tokenizer, data_folder, list(SKILLS))
    return {
        "lab_version": LAB_VERSION,
        "size": cfg.size,
        "seed": seed,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_seconds": round(stats["seconds"], 1),
        "final_loss": round(stats["final_loss"], 4),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "data": str(data_folder),
        "eval_examples": cfg.n_eval,
        "accuracy": accuracy,
        "pretrain_skills": PRETRAIN_SKILLS,
        "new_skills": NEW_SKILLS,
        "skills": {n: {"tag": s.tag, "kind": s.kind, "description": s.description} for n, s in SKILLS.items()},
    }


def card_markdown(card: dict) -> str:
    lines = [
        f"# ppft lab `{card['size']}` (seed {card['seed']})",
        "",
        f"{card['parameters']:,} parameters; pretrained in {card['pretrain_seconds']} s on {card['device']} "
        f"({card['torch_threads']} threads); final loss {card['final_loss']}.",
        "",
        "| skill | kind | role | example prompt tag | exact match (base) |",
        "|---|---|---|---|---|",
    ]
    for name, info in card["skills"].items():
        role = "pretraining" if name in card["pretrain_skills"] else "new task"
        lines.append(f"| {name} | {info['kind']} | {role} | `{info['tag']}:` | {card['accuracy'][name]:.3f} |")
    lines += ["", f"Exact match on {card['eval_examples']} held-out prompts per skill (recall: the memorised fact table)."]
    return "\n".join(lines) + "\n"


def read_card(size: str, seed: int = 0) -> dict | None:
    path = build_path(size, seed) / "card.json"
    return json.loads(path.read_text()) if path.exists() else None
