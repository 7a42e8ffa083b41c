"""A byte-level BPE tokenizer with no merges (one token per byte), saved beside tiny test models."""

from __future__ import annotations

from pathlib import Path


def save_byte_tokenizer(root: Path) -> None:
    """Writes a transformers tokenizer of the 256 byte-level symbols to ``root``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root)
