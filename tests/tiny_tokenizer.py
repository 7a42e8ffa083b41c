"""Tiny test models: a byte-level BPE tokenizer with no merges (one token per byte), a seeded tiny Llama, and a model directory holding both."""

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


def tiny_lm(**config):
    """A seeded random-init tiny Llama (``ds_msattn.models.tiny_llama_config``), sdpa attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from ds_msattn.models import tiny_llama_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**config), attn_implementation="sdpa").eval()


def tiny_model_dir(root: Path) -> Path:
    """``root`` holding :func:`tiny_lm`, the byte tokenizer and a short ``doc.txt``: a model directory for CLI tests."""
    save_byte_tokenizer(root)
    tiny_lm().save_pretrained(root)
    (root / "doc.txt").write_text("It was the best of times, it was the worst of times. " * 12)
    return root
