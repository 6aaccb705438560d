"""Retention measured during training: the preserve suite every ``eval.every_n_steps`` steps."""

from __future__ import annotations

from .methods.base import unwrap_model


class RetentionTracker:
    """Scores the preserve suite on the model being trained; the base scores come from step 0."""

    def __init__(self, recipe, tokenizer, accelerator, model):
        self.tasks = recipe.eval.preserve
        self.batch_size = recipe.eval.batch_size
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.base = self._scores(model)

    @classmethod
    def maybe(cls, recipe, tokenizer, accelerator, model) -> RetentionTracker | None:
        if not recipe.eval.every_n_steps or not recipe.eval.preserve:
            return None
        return cls(recipe, tokenizer, accelerator, model)

    def _scores(self, model) -> dict[str, float]:
        from .evaluation import evaluate_suite

        inner = unwrap_model(model)
        was_training = inner.training
        inner.eval()
        results = evaluate_suite(inner, self.tokenizer, self.tasks, self.batch_size)
        inner.train(was_training)
        return {name: r.score for name, r in results.items()}

    def measure(self, model) -> dict[str, float]:
        """``{"preserve/<task>": score, "retention/<task>": score / base, "retention/mean": ...}``."""
        scores = self._scores(model)
        out = {f"preserve/{k}": v for k, v in scores.items()}
        ratios = {k: (v / self.base[k] if self.base[k] else float("nan")) for k, v in scores.items()}
        out.update({f"retention/{k}": v for k, v in ratios.items()})
        out["retention/mean"] = sum(ratios.values()) / max(len(ratios), 1)
        return out
