"""The subword vocabulary of critiques and narratives: a byte-level BPE trained on the run's own
text (item titles, training critiques and narratives) with HF ``tokenizers``, stored beside the
vocabulary (``<sequences>/tokenizer.json``) and in the bundle, so serving reads text exactly as
training did and nothing is downloaded.

Byte-level: every string has an encoding, so a word never seen in training (a misspelling, a brand
the catalogue lacks) becomes several subwords, never an unknown token. Text is NFKC-normalised and
lower-cased first. Ids here are the tokenizer's own, ``0 .. size - 1``; the model's vocabulary puts
them after the item tokens (:attr:`moe_rec.data.vocab.Vocabulary.text_offset`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from moe_rec.data.schema import DataError

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """Encode and decode text with a trained byte-level BPE (:func:`train_tokenizer`)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids (0 .. size - 1) of ``text``."""
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of subword ids (normalised: lower case)."""
        return self._tok.decode(list(ids)).strip()

    def word_starts(self) -> np.ndarray:
        """(size,) bool: the subword begins a word, i.e. carries the leading space ("Ġ" in
        byte-level BPE; text is encoded with a prefix space, so the first word has one too). A word
        is what whitespace separates, punctuation attached ("argan-oil,")."""
        starts = np.zeros(self.size, dtype=bool)
        for piece, i in self._tok.get_vocab().items():
            starts[i] = piece.startswith("Ġ")
        return starts

    def save(self, directory: Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, directory: Path) -> TextTokenizer:
        """The tokenizer saved in ``directory``; a missing or unreadable file is a :class:`DataError`."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise DataError(f"{path} not found: build the sequences with critiques on (critiques.enabled)")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad JSON
            raise DataError(f"{path}: not a tokenizer file ({e})") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """A byte-level BPE of at most ``vocab_size`` subwords (the 256 bytes included) learned from
    ``texts``; the same texts in the same order give the same tokenizer."""
    if vocab_size < 257:
        raise ValueError(f"a byte-level tokenizer needs vocab_size > 256 (its bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)
