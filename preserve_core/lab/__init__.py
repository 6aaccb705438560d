"""The skills lab: the embedded default model with exactly measurable capabilities, and its data.

``model: lab:tiny`` in a recipe resolves to a pretrained lab model (built on first use, cached under
``lab_home()``), ``data: lab:<skill>`` to that skill's training rows and ``lab:<skill>@eval`` to its
held-out eval rows. ``lab:preserve_mix`` is label-free text of all pretraining skills (``text`` rows; its eval split is
the skills' held-out rows as text, for ``kl_to_base`` and ``perplexity`` tasks).
"""

from __future__ import annotations

import difflib
import sys

from ..errors import RecipeError
from .build import build_lab, build_path, data_dir, ensure_data, is_built, lab_home, preset, read_card, skill_accuracy, upgrade_tokenizer, write_preserve_mix_eval
from .config import LAB_VERSION, PRESETS, LabConfig
from .skills import NEW_SKILLS, PRETRAIN_SKILLS, SKILLS

DATA_SETS = [*SKILLS, "preserve_mix"]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_model_ref(ref: str) -> str:
    """``lab:<size>`` -> the folder of the built model, building it first (minutes) if absent."""
    size = ref.removeprefix("lab:")
    if size not in PRESETS:
        raise RecipeError(f"unknown lab model '{ref}'.{_suggest(size, list(PRESETS))} Available: {', '.join('lab:' + s for s in PRESETS)}.")
    if is_built(size):
        upgrade_tokenizer(build_path(size))
    else:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]Building the lab model '{size}'[/] (once; cached in {lab_home()}) ...")
        from .progress import build_with_progress

        build_with_progress(size, 0, force=False, show=sys.stderr.isatty())
    return str(build_path(size) / "model")


def resolve_data_ref(ref: str, split: str = "train", size: str = "tiny") -> str:
    """``lab:<skill>`` -> the JSONL file of that skill's ``split`` (``train`` or ``eval``)."""
    name = ref.removeprefix("lab:")
    if name not in DATA_SETS:
        raise RecipeError(f"unknown lab data set '{ref}'.{_suggest(name, DATA_SETS)} Available: {', '.join('lab:' + s for s in DATA_SETS)}.")
    if split not in ("train", "eval"):
        raise RecipeError(f"lab data set '{ref}' has no split '{split}' (use lab:{name} or lab:{name}@eval).")
    folder = ensure_data(preset(size))
    if name == "preserve_mix" and split == "eval":
        return str(write_preserve_mix_eval(folder))  # added after the first release of the data folder
    return str(folder / name / f"{split}.jsonl")


__all__ = [
    "DATA_SETS", "LAB_VERSION", "NEW_SKILLS", "PRESETS", "PRETRAIN_SKILLS", "SKILLS", "LabConfig",
    "build_lab", "build_path", "data_dir", "ensure_data", "is_built", "lab_home", "preset", "read_card",
    "resolve_data_ref", "resolve_model_ref", "skill_accuracy",
]  # fmt: skip
