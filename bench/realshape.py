"""Random-initialised models at published widths, few layers, lab vocabulary: built locally, no downloads.

    SHAPES["qwen3-1.7b"]  hidden 2048, intermediate 6144, 16 heads / 8 kv heads, head_dim 128 (Qwen3Config)
    SHAPES["llama3-8b"]   hidden 4096, intermediate 14336, 32 heads / 8 kv heads, head_dim 128 (LlamaConfig)
    SHAPES["qwen3-0.6b"]  hidden 1024, intermediate 3072, 16 heads / 8 kv heads, head_dim 128 (Qwen3Config)

``build(shape, layers, folder)`` saves the model (float32 safetensors) and the lab tokenizer into
``folder``; the vocabulary is the lab tokenizer's, so embeddings stay small and the decoder layers
dominate, as they do at real depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    family: str  # "qwen3" or "llama"
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int  # the real model's depth (for predictions at full size)

    def input_widths(self) -> list[int]:
        """Widths of the distinct target-layer inputs of one decoder layer: attention in (q/k/v),
        o_proj in, MLP in (gate/up), down_proj in."""
        return [self.hidden, self.heads * self.head_dim, self.hidden, self.intermediate]

    def target_shapes(self) -> list[tuple[str, int, int]]:
        """``(name, m, n)`` of the seven target linears of one decoder layer (``W`` is [m, n])."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]  # fmt: skip

    def input_of(self) -> dict[str, int]:
        """Target name -> index into :meth:`input_widths` of the input it reads."""
        return {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


SHAPES = {
    "qwen3-1.7b": Shape("qwen3", 2048, 6144, 16, 8, 128, 28),
    "llama3-8b": Shape("llama", 4096, 14336, 32, 8, 128, 32),
    "qwen3-0.6b": Shape("qwen3", 1024, 3072, 16, 8, 128, 28),
    "smoke": Shape("qwen3", 256, 768, 4, 2, 64, 2),  # for checking the bench scripts quickly
}


def config(shape: Shape, layers: int, vocab: int, specials: dict[str, int]):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=4096, tie_word_embeddings=False, **specials,
    )  # fmt: skip
    return Qwen3Config(**common) if shape.family == "qwen3" else LlamaConfig(**common)


def make(name: str, layers: int, seed: int = 0):
    """``(model, tokenizer)``: a random float32 ``name``-shaped model with ``layers`` layers, lab tokenizer."""
    from transformers import AutoModelForCausalLM

    from preserve_core.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    specials = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(SHAPES[name], layers, len(tokenizer), specials), dtype=torch.float32)
    return model.eval(), tokenizer


def build(name: str, layers: int, folder: Path, seed: int = 0) -> Path:
    """Save a random ``name``-shaped model with ``layers`` layers and the lab tokenizer into ``folder``."""
    model, tokenizer = make(name, layers, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
