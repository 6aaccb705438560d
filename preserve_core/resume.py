"""Resuming a run: which checkpoint, whether the recipe changed since, and how a change is applied.

The recipe a checkpoint was made with travels in its ``trainer_state.json`` (``TrainState.recipe``).
``--resume`` compares it with the recipe given now, key by key:

- bookkeeping keys (``BOOKKEEPING``: the run's name, output, eval, logging and saving cadence) may
  change freely; the change is reported;
- any other change is refused (exit 2, listing the keys) unless ``--allow-changes`` is given. Then
  the run is rebuilt from the new recipe and the checkpoint restores weights, optimizer moments,
  data position and RNG; the optimizer's hyperparameters (lr, betas, eps, weight decay) and the
  learning-rate schedule are the new recipe's, evaluated at the resumed step ``s``: the next update
  uses ``lr_new * schedule_new(s)``. The changes are recorded in ``metrics.jsonl`` and
  ``manifest.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .checkpoint_integrity import CHECKSUMS, newest_intact
from .errors import RecipeError
from .progress import notice

BOOKKEEPING = (
    "name", "output.", "eval.", "training.log_every", "training.eval_every", "training.save_every",
    "training.keep_last", "training.tensorboard", "training.threads",
    "training.distributed.",  # DDP vs FSDP: the same updates
)  # fmt: skip


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest intact checkpoint of ``run_dir``; newer damaged ones are skipped with a warning saying why.

    Raises RecipeError (exit 2) when no checkpoint is intact.
    """
    folders = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    found, skipped = newest_intact(folders)
    fallback = f"; resuming from {found.name} instead" if found else ""
    for path, problem in skipped:
        notice(f"--resume: skipping {path}: {problem}{fallback}.")
    if found is None:
        raise RecipeError(
            f"--resume: no intact checkpoint in {run_dir} ("
            + "; ".join(f"{p.name}: {why}" for p, why in skipped)
            + "). Start again without --resume, with --set output.overwrite=true."
        )
    if not (found / CHECKSUMS).exists():
        notice(f"--resume: {found} has no {CHECKSUMS} (written by an older ppft); its files cannot be verified.")
    return found


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def recipe_changes(old: dict, new: dict) -> dict[str, list]:
    """``{dotted key: [old value, new value]}`` for every leaf that differs (missing leaves are None)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def checkpoint_recipe(checkpoint: Path) -> dict | None:
    """The resolved recipe the checkpoint was made with; for older checkpoints, the run's recipe.resolved.yaml."""
    recipe = json.loads((checkpoint / "trainer_state.json").read_text()).get("recipe")
    if recipe is None and (checkpoint.parent / "recipe.resolved.yaml").exists():
        recipe = yaml.safe_load((checkpoint.parent / "recipe.resolved.yaml").read_text())
    return recipe


def _show(changes: dict[str, list]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_recipe_changes(recipe, checkpoint: Path, allow_changes: bool) -> dict[str, list]:
    """The training-relevant changes since ``checkpoint`` (empty: none). Refuses them unless ``allow_changes``."""
    old = checkpoint_recipe(checkpoint)
    if old is None:
        notice(f"--resume: {checkpoint} does not record its recipe; changes to the recipe cannot be detected.")
        return {}
    changes = recipe_changes(old, recipe.resolved())
    cosmetic = {k: v for k, v in changes.items() if k.startswith(BOOKKEEPING)}
    relevant = {k: v for k, v in changes.items() if k not in cosmetic}
    if cosmetic:
        notice(f"--resume: bookkeeping settings changed since {checkpoint.name} ({_show(cosmetic)}).")
    if relevant and not allow_changes:
        raise RecipeError(
            f"--resume: the recipe changed since {checkpoint.name}: {_show(relevant)}. Resume with the recipe "
            "as it was, or add --allow-changes to continue under the new values (optimizer settings and "
            "the learning-rate schedule are then the new recipe's from the resumed step on)."
        )
    if relevant:
        notice(f"--resume --allow-changes: continuing from {checkpoint.name} with {_show(relevant)}.")
    return relevant


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """Each param group's settings (lr, betas, eps, weight decay, initial_lr, ...), without the parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_new_hyperparameters(optimizer, scheduler, fresh: list[dict], step: int) -> None:
    """Put the new recipe's optimizer settings over the restored moments; the schedule is the new one at ``step``.

    ``fresh``: :func:`optimizer_hyperparameters` of the optimizer and scheduler built from the new recipe,
    taken before the checkpoint was loaded. After this, group ``i`` has ``lr = initial_lr_i * lambda_i(step)``.
    """
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step - 1
    scheduler.step()
