"""The lab's character tokenizer: a real ``tokenizers`` model that ``AutoTokenizer`` loads back."""

from __future__ import annotations

from .skills import ALPHABET

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: one token per character of ``ALPHABET``, bos/eos/pad/unk specials.

    Decoding fuses tokens without separators, so ``decode(encode(s)) == s`` for lab text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
        padding_side="right",
    )
