"""Loading causal LMs and tokenizers, choosing target modules, fingerprinting weights."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import RecipeError
from .recipe_schema import ModelConfig

# Attention and MLP linears by architecture family; anything else: every nn.Linear but the LM head.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str) -> str:
    """``lab:<size>`` -> the built lab model's folder (building it if absent); anything else unchanged."""
    if name_or_path.startswith("lab:"):
        from .lab import resolve_model_ref

        return resolve_model_ref(name_or_path)
    return name_or_path


def base_model_reference(name_or_path: str) -> str:
    """What an export records as its base model: a string ``from_pretrained`` loads anywhere.

    ``lab:<size>`` becomes the built lab model's absolute folder, an existing local folder its
    absolute path; a hub id stays as it is.
    """
    path = resolve_model_path(name_or_path)
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def write_model_card(folder: Path, base_ref: str) -> None:
    """``README.md`` with the Hub's model-card metadata (``base_model``) in a full-weight export folder."""
    (Path(folder) / "README.md").write_text(
        f"---\nbase_model: {json.dumps(base_ref)}\nlibrary_name: transformers\ntags: [ppft]\n---\n\n"
        f"Full weights fine-tuned with ppft from `{base_ref}`. "
        "Load with `AutoModelForCausalLM.from_pretrained(<this folder>)`.\n"
    )


def quiet_transformers() -> None:
    """No per-shard progress bars or deprecation chatter from transformers inside our own progress display."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(cfg: ModelConfig) -> int | None:
    """Positions the model was built for (``max_position_embeddings`` or its synonyms); None if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    values = [getattr(config, key, None) for key in CONTEXT_KEYS]
    return next((v for v in values if isinstance(v, int) and v > 0), None)


def load_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """An ``AutoModelForCausalLM`` from a hub name, local folder or lab ref (safetensors only)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model_path(cfg.name_or_path)
    kwargs = {"dtype": DTYPES[cfg.dtype], "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.name_or_path: cannot load a causal LM from {path!r}: {e}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if device is not None:
        model.to(device)
    return model


def resolve_target_modules(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Full names of the linear layers to adapt, in module order.

    A pattern matches a module whose name equals it or ends with ``.<pattern>``; ``re:<regex>``
    matches the full name. ``None`` uses :data:`DEFAULT_TARGETS` for the architecture.
    """
    if patterns is None:
        patterns = DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), None)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if patterns is None:
        head = model.get_output_embeddings()
        return [n for n, m in linears if m is not head]
    selected = [n for n, _ in linears if any(_matches(n, p) for p in patterns)]
    if not selected:
        sample = ", ".join(n for n, _ in linears[:8])
        raise RecipeError(
            f"model.target_modules: {patterns} matches no linear layer of this model. Linear layers look like: {sample}"
        )
    return selected


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture config and a sample of every weight tensor (cheap, deterministic)."""
    h = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    keep = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h.update(json.dumps(keep, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, steps=min(64, flat.numel())).long()
            h.update(name.encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
            h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
