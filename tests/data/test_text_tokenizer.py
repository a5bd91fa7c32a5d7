"""The subword tokenizer of critiques and narratives: lower-cased round trips, words never seen
split into known subwords, the same texts giving the same tokenizer, save / load, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_rec.data.schema import DataError
from moe_rec.data.text_tokenizer import TOKENIZER_FILE, TextTokenizer, train_tokenizer

TEXTS = [
    "Anything cheaper? Not a fan of Revlon.",
    "Something in lip gloss, by Maybelline maybe",
    "A budget pick in lotions by Nivea, with shea and cocoa",
    "You have bought 3 other things in lotions.",
] * 20


def test_round_trip_unknown_words_and_determinism(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, 320)
    assert 256 < tok.size <= 320
    for text in ("Anything cheaper?", "Zxqvbrandé — 50% off!", "ünïcödé lotion"):
        ids = tok.encode(text)
        assert all(0 <= i < tok.size for i in ids)
        assert tok.decode(ids) == text.lower()  # byte level: nothing is lost but the case
    known = tok.encode("lotions")
    assert len(known) < len(tok.encode("zxqvbrandé"))  # a seen word is fewer subwords than gibberish
    again = train_tokenizer(TEXTS, 320)
    assert [again.encode(t) for t in TEXTS[:4]] == [tok.encode(t) for t in TEXTS[:4]]
    tok.save(tmp_path)
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.size == tok.size and loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_bad_sizes_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size > 256"):
        train_tokenizer(TEXTS, 100)
    with pytest.raises(DataError, match="not found"):
        TextTokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer file"):
        TextTokenizer.load(tmp_path)
