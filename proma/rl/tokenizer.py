"""A small byte-level BPE tokenizer trained with ``tokenizers`` on the GSM8K training text.

Digits are split individually before byte-level BPE (as Qwen and LLaMA do), so numbers are spelt digit by digit
and arithmetic stays learnable with a few hundred merges. Special tokens: ``<|pad|>`` (id 0) and
``<|endoftext|>`` (id 1, EOS). Training is deterministic (same corpus + vocab size -> same ``tokenizer.json``,
tested); the result is cached in ``cache_dir`` under a key hashing the corpus and the settings, and returned
as a ``transformers.PreTrainedTokenizerFast`` so our tokenizer and any ``--model PATH`` tokenizer share one
interface.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
_VERSION = 1  # bump when the recipe below changes, so cached files are not reused


def train_bpe(texts: list[str], vocab_size: int):
    """Train the byte-level BPE and return a ``tokenizers.Tokenizer``.

    ``vocab_size`` counts the 2 special tokens and the 256 byte symbols, so it must be >= 258.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 258 (2 special tokens + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def corpus_key(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-v{_VERSION}-vocab{vocab_size}\n".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprint(tokenizer) -> str:
    """Hash of what defines a tokenizer's ids (vocabulary, merges, pre-tokenizer, special tokens), ignoring
    mutable state such as padding settings. Accepts a ``PreTrainedTokenizerFast`` or a ``tokenizers.Tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "to_str"):
        d = json.loads(backend.to_str())
        d = {k: d.get(k) for k in ("model", "pre_tokenizer", "normalizer", "added_tokens")}
        text = json.dumps(d, sort_keys=True)
    else:  # a slow tokenizer: its vocabulary
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wrap(tok):
    """``tokenizers.Tokenizer`` -> ``PreTrainedTokenizerFast`` with pad/eos set (left padding for generation)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
    fast.padding_side = "left"
    return fast


def get_tokenizer(vocab_size: int, cache_dir: str | os.PathLike, data_dir=None):
    """The GSM8K BPE tokenizer of ``vocab_size``, trained once and cached as ``cache_dir/tokenizer-<key>.json``."""
    from tokenizers import Tokenizer

    from .data import tokenizer_corpus

    texts = tokenizer_corpus(data_dir)
    key = corpus_key(texts, vocab_size)
    path = Path(cache_dir) / f"tokenizer-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_bpe(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent runs sharing a cache never read a half-written file
    return wrap(tok)
