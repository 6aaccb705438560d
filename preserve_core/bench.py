"""``ppft bench``: the learning-vs-forgetting comparison as a command.

Every (task, method, learning rate, seed) cell is trained from the same base recipe with the same
steps, batch and eval, then scored on the new task (exact match) and on every preserve task, and
optionally by the KL of its next-token distributions from the base model. A finished cell's
``cell.json`` is never recomputed, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import RecipeError
from .recipe import Recipe, validate_recipe
from .recipe_schema import BenchTask, EvalTask
from .runs import write_atomic


@dataclass(frozen=True)
class Cell:
    task: str
    label: str
    lr: float
    seed: int
    method_json: str  # the method section, as sorted JSON (hashable)
    training_json: str = "{}"  # the row's own training settings, likewise

    @property
    def id(self) -> str:
        settings = self.method_json if self.training_json == "{}" else f"{self.method_json} {self.training_json}"
        options = hashlib.sha256(settings.encode()).hexdigest()[:6]  # edited options: a new cell
        return f"{self.task}__{self.label}__lr{self.lr:g}__s{self.seed}__{options}"

    @property
    def method(self) -> dict:
        return json.loads(self.method_json)

    @property
    def training(self) -> dict:
        return json.loads(self.training_json)


def default_label(method: dict) -> str:
    """``<method name>`` plus ``+<regulariser>`` for each of its regularisers (fora+kl+replay)."""
    regs = method.get("regularizers") or []
    return "+".join([str(method.get("name", "?")), *(str(r.get("name", "?")) for r in regs if isinstance(r, dict))])


def row_label(entry) -> str:
    """A ``bench.methods`` row's label: its own, else :func:`default_label` of its method."""
    return entry.label or default_label(entry.method)


def plan_cells(recipe: Recipe) -> list[Cell]:
    bench = recipe.bench
    if not bench.methods or not bench.tasks:
        raise RecipeError("bench: list at least one entry in bench.methods and bench.tasks (see docs/results.md)")
    labels = [row_label(m) for m in bench.methods]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"bench.methods: labels must be unique, got {labels}; set label: on repeated methods")
    return [
        Cell(task.name, label, lr, seed, json.dumps(entry.method, sort_keys=True),
             json.dumps(entry.training.settings(), sort_keys=True))
        for task in bench.tasks
        for entry, label in zip(bench.methods, labels)
        for lr in entry.lrs
        for seed in bench.seeds
    ]


def select_cells(plan: list[Cell], only: list[str]) -> list[Cell]:
    """The cells of the methods labelled in ``only`` (all when empty); an unknown label is an error."""
    labels = list(dict.fromkeys(c.label for c in plan))
    unknown = [label for label in only if label not in labels]
    if unknown:
        raise RecipeError(f"--only {', '.join(unknown)}: no bench method has that label; the labels are {', '.join(labels)}")
    return [c for c in plan if not only or c.label in only]


def target_task(task: BenchTask) -> EvalTask:
    return EvalTask(name=task.name, kind="exact_match", data=task.eval, max_new_tokens=task.max_new_tokens, limit=task.limit)


def task_eval_data(task: BenchTask) -> str:
    """The task's held-out rows as a ``data.eval`` source: ``lab:<skill>`` means its eval split there too."""
    if task.eval.startswith("lab:") and "@" not in task.eval:
        return f"{task.eval}@eval"
    return task.eval


def cell_recipe(base: Recipe, cell: Cell, task: BenchTask, cells_dir: Path) -> Recipe:
    """The base recipe with this cell's method, its row's training settings, learning rate, seed, task data
    and run folder.

    ``data.eval`` (the periodic eval loss) is the cell's own task, never the base recipe's.
    """
    data = base.model_dump(mode="json")
    data.pop("bench")
    data["name"] = cell.id
    data["method"] = cell.method
    data["training"].update(cell.training)
    data["training"].update(lr=cell.lr, seed=cell.seed, keep_last=1)
    data["data"].update(train=task.train, eval=task_eval_data(task))
    data["eval"]["target"] = [target_task(task).model_dump(mode="json")]
    data["eval"]["every_n_steps"] = 0
    data["output"].update(dir=str(cells_dir / cell.id), overwrite=True, merge=False)
    data["calibration"]["dir"] = str(cells_dir / f"calibration__{task.name}__s{cell.seed}")  # shared by methods
    return validate_recipe(data, {("bench",): (f"bench cell {cell.id}", 0)})


def validate_plan(base: Recipe, cells: list[Cell], cells_dir: Path) -> None:
    """Build every cell's recipe up front, so a typo in one method fails before hours of training."""
    tasks = {t.name: t for t in base.bench.tasks}
    for cell in cells:
        try:
            cell_recipe(base, cell, tasks[cell.task], cells_dir)
        except RecipeError as e:
            raise RecipeError(f"bench.methods ({cell.label}): {e}") from None


def score_dict(result) -> dict:
    return {"score": result.score, "n": result.n, "stderr": result.stderr, "metric": result.metric}


class BenchRunner:
    """Runs the cells of a bench recipe in one process, sharing the base model's evaluation."""

    def __init__(self, recipe: Recipe, progress=None):
        self.recipe = recipe
        self.out = Path(recipe.bench.out_dir)
        self.cells_dir = self.out / "cells"
        self.tasks = {t.name: t for t in recipe.bench.tasks}
        self.progress = progress or (lambda message: None)
        self._tokenizer = None
        self._base = None

    def base_model(self):
        from .models import load_model, load_tokenizer

        if self._base is None:
            self._tokenizer = load_tokenizer(self.recipe.model)
            self._base = load_model(self.recipe.model).eval()
        return self._base, self._tokenizer

    def kl_task(self) -> EvalTask | None:
        bench = self.recipe.bench
        if not bench.kl_data:
            return None
        return EvalTask(name="kl_to_base", kind="kl_to_base", data=bench.kl_data, limit=bench.kl_limit)

    def base_scores(self) -> dict:
        """Base-model scores on every target and preserve task, kept in base.json; tasks added later are scored then."""
        path = self.out / "base.json"
        scores = json.loads(path.read_text()) if path.exists() else {}
        tasks = [target_task(t) for t in self.tasks.values()] + list(self.recipe.eval.preserve)
        missing = [t for t in tasks if t.name not in scores]
        if not missing:
            return scores
        from .evaluation import evaluate_suite

        base, tokenizer = self.base_model()
        self.progress("base model: evaluating")
        results = evaluate_suite(base, tokenizer, missing, self.recipe.eval.batch_size)
        scores.update({name: score_dict(r) for name, r in results.items()})
        write_atomic(path, json.dumps(scores, indent=2))
        return scores

    def finished(self, cell: Cell) -> bool:
        return (self.cells_dir / cell.id / "cell.json").exists()

    def write_results(self, plan: list[Cell], ran_now: set[str]) -> tuple[list[dict], str]:
        """results.json/.md and pareto.png from every planned cell with a result: (aggregated rows, what was rebuilt)."""
        from .bench_report import describe_rebuild, gather_cells, write_results

        cells, counts = gather_cells(self.out, [c.id for c in plan], ran_now)
        r = self.recipe
        settings = {"steps": r.training.max_steps, "batch_size": r.training.batch_size, "seeds": r.bench.seeds,
                    "model": r.model.name_or_path, "held_out": [t.name for t in r.bench.tasks if t.held_out]}  # fmt: skip
        own = {row_label(m): row for m in r.bench.methods if (row := m.training.settings())}
        if own:
            settings["row_training"] = own  # rows whose training settings differ from the recipe's
        rows = write_results(self.out, cells, self.base_scores(), [t.name for t in r.eval.preserve], settings)
        return rows, describe_rebuild(self.out, counts)

    def run_cell(self, cell: Cell) -> dict:
        from .evaluation import evaluate_suite
        from .training import train

        path = self.cells_dir / cell.id / "cell.json"
        if path.exists():
            prune_cell(path.parent)  # cells finished before pruning existed
            return json.loads(path.read_text())
        recipe = cell_recipe(self.recipe, cell, self.tasks[cell.task], self.cells_dir)
        shutil.rmtree(path.parent, ignore_errors=True)  # what an interrupted attempt left: start clean
        start = time.perf_counter()
        result = train(recipe, show_progress=False)
        if result.interrupted:  # a half-trained cell is never scored; the next run restarts it
            raise KeyboardInterrupt
        train_seconds = time.perf_counter() - start
        model = result.model.eval()
        base, tokenizer = self.base_model()
        tasks = list(recipe.eval.target) + list(recipe.eval.preserve)
        start = time.perf_counter()
        with torch.no_grad():
            scores = {n: score_dict(r) for n, r in evaluate_suite(model, tokenizer, tasks, recipe.eval.batch_size).items()}
            kl = self.kl_task()
            if kl is not None:
                scores["kl_to_base"] = score_dict(evaluate_suite(model, tokenizer, [kl], recipe.eval.batch_size, base)[kl.name])
        record = {
            **asdict(cell),
            "method": cell.method,
            "id": cell.id,
            "final_loss": result.final_loss,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
            "scores": scores,
        }
        record.pop("method_json")
        record.pop("training_json")
        if cell.training:
            record["training"] = cell.training
        del model, result
        prune_cell(path.parent)
        write_atomic(path, json.dumps(record, indent=2))
        gc.collect()
        return record


def prune_cell(folder: Path) -> None:
    """Drop what only a resumed or exported run would need (checkpoints with optimizer state, final/).

    A cell is rerun whole or not at all, so its folder keeps ``cell.json`` (the scores),
    ``metrics.jsonl``, ``manifest.json`` and ``recipe.resolved.yaml``; ``ppft train`` on that recipe
    (with ``--output-dir``) rebuilds the model if it is wanted.
    """
    for name in ["final", ".tmp-final", *(p.name for p in folder.glob("*checkpoint-*"))]:
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / ".lock").unlink(missing_ok=True)  # the finished run's lock (preserve_core.runlock)
