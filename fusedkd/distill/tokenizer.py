"""The embedded default's tokenizer: a byte-level BPE trained on the training corpus, cached on disk.

Byte-level BPE, as Qwen3's own tokenizer (with a much smaller vocabulary), so every string has a
tokenization. The one special token, ``<|endoftext|>``, is end-of-sequence and padding, as in Qwen3.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusedkd.distill.cache import building, cache_key

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE on `texts`; return it as a `transformers.PreTrainedTokenizerFast`.

    Example:
        >>> tokenizer = train_bpe_tokenizer(["def f(x):\\n    return x + 1\\n"] * 20, vocab_size=300)
        >>> tokenizer.decode(tokenizer("return x")["input_ids"])
        'return x'
        >>> tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
        True
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def cached_bpe_tokenizer(texts: Sequence[str], vocab_size: int, corpus_fingerprint: str, cache_dir: Path):
    """`train_bpe_tokenizer`, trained once per (corpus, vocab size) and then loaded from `cache_dir`.

    Returns ``(tokenizer, path, built)``: `built` is True when this call trained it.
    """
    from transformers import AutoTokenizer

    entry = Path(cache_dir) / f"tokenizer-{cache_key('bpe-v1', vocab_size, corpus_fingerprint)}"
    built = False
    if not (entry / "tokenizer.json").is_file():
        with building(entry) as scratch:
            train_bpe_tokenizer(texts, vocab_size).save_pretrained(scratch)
        built = True
    return AutoTokenizer.from_pretrained(entry), entry, built
