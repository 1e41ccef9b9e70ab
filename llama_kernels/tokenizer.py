"""SentencePiece BPE tokenizer, trained as in the paper: numbers split into single digits and
unknown UTF-8 characters decomposed into bytes (byte fallback), so any text round-trips.

Special ids follow Meta's tokenizer: unk 0, bos 1, eos 2, no pad (``pad_id == -1``).
Text is not normalized (``identity`` rule, extra whitespace kept), so ``decode(encode(t)) == t``
for every string except one holding U+2581 (``▁``, SentencePiece's own whitespace marker, which
decodes to a space; Meta's tokenizer has the same limit).

Needs the ``sentencepiece`` package (``pip install sentencepiece``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

try:
    import sentencepiece as spm
except ImportError:  # only this module needs it: the rest of the package works without it
    spm = None


def _require_sentencepiece():
    if spm is None:
        raise ImportError("llama_kernels.tokenizer needs sentencepiece: pip install sentencepiece")
    return spm


class Tokenizer:
    """A trained SentencePiece model: ``encode(text, bos=True, eos=False)`` / ``decode(ids)``."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model_path: no tokenizer model at {model_path!r}")
        self.sp = _require_sentencepiece().SentencePieceProcessor(model_file=model_path)
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bos, eos and other control ids decode to nothing."""
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def __len__(self) -> int:
        return self.vocab_size


def train_tokenizer(files: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int,
                    model_prefix: str | os.PathLike, **options) -> str:
    """Train a BPE model on text ``files`` (one sentence per line); returns the ``.model`` path.

    The paper's settings (split_digits, byte_fallback) and Meta's special ids are fixed; any
    other SentencePiece trainer option may be passed (``input_sentence_size=...``, say).
    ``vocab_size`` must leave room for the 256 byte pieces and the 3 special ones.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("files: expected at least one text file")
    if vocab_size < 256 + 3 + 1:
        raise ValueError(f"vocab_size: {vocab_size} leaves no room beyond the 256 byte pieces "
                         "and 3 special pieces")
    model_prefix = os.fspath(model_prefix)
    settings = dict(
        input=files,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.99995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=min(4, os.cpu_count() or 1),
        minloglevel=2,
    )
    settings.update(options)
    with open(os.devnull, "w") as quiet:
        _require_sentencepiece().SentencePieceTrainer.train(**settings, logstream=quiet)
    return model_prefix + ".model"


__all__ = ["Tokenizer", "train_tokenizer"]
