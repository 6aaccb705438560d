"""The lab's character tokenizer: a real ``tokenizers`` model that ``AutoTokenizer`` loads back."""

from __future__ import annotations

import json
from pathlib import Path

from .skills import ALPHABET

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: one token per character of ``ALPHABET``, bos/eos/pad/unk specials.

    Like Llama tokenizers, a ``TemplateProcessing`` post-processor puts ``<s>`` before every text,
    so plain ``tok(prompt)`` gives ``[<s>] + prompt``, exactly what the lab model was pretrained on
    (``tok(prompt, add_special_tokens=False)`` gives the bare characters). Decoding fuses tokens
    without separators, so ``decode(encode(s), skip_special_tokens=True) == s`` for lab text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        model_max_length=64,
        padding_side="right",
    )


def adds_bos(model_dir: Path) -> bool:
    """Whether the saved tokenizer in ``model_dir`` puts ``<s>`` before a text (builds before lab 1.1 did not)."""
    post = json.loads((Path(model_dir) / "tokenizer.json").read_text()).get("post_processor") or {}
    return "<s>" in (post.get("special_tokens") or {})
