"""The item words the item model matches critiques against: each field of each catalogue item, in
SID-table row order, tokenised as critiques are, by hand."""

from __future__ import annotations

import random

import pyarrow as pa

from moe_rec.data.item_attributes import service_attributes
from moe_rec.data.item_words import WORD_FIELDS, encode_item_words, item_terms, item_word_texts, item_words
from moe_rec.data.text_tokenizer import train_tokenizer
from moe_rec.data.vocab import PAD

ITEMS = [
    {"service": "s", "item_id": f"x{i}", "title": f"Red lip gloss {i}", "categories": ["R", "Lips", "Gloss"],
     "brand": "Maybelline", "price": p}
    for i, p in enumerate([1.0, 2.0, 3.0])
] + [
    {"service": "t", "item_id": "y0", "title": "Argan shampoo", "categories": ["R", "Hair"], "brand": None,
     "price": None},
]  # fmt: skip


KEYS = [("t", "y0"), ("s", "x2"), ("s", "x0"), ("s", "x1")]  # another order than the catalogue's


def test_fields_per_table_row_with_bands_named_as_critiques_name_them() -> None:
    texts = item_word_texts(pa.Table.from_pylist(ITEMS), KEYS, num_bands=3, min_band_items=3)
    assert len(WORD_FIELDS) == 4
    assert texts[0] == ["", "Hair", "", "Argan shampoo"]  # no brand, no price
    assert texts[1] == ["Maybelline", "Gloss", "premium", "Red lip gloss 2"]
    assert texts[2] == ["Maybelline", "Gloss", "budget", "Red lip gloss 0"]
    assert texts[3][2] == "mid-price"


def test_encoding_cuts_pads_and_offsets_each_field_as_the_tokenizer_does() -> None:
    tok = train_tokenizer([t for r in ITEMS for t in (r["title"], r["brand"] or "")] * 3, 300)
    texts = [["Maybelline", "", "budget", "red lip gloss with argan and more words"], ["", "", "", ""]]
    out = encode_item_words(texts, tok, text_offset=100, slots=4)
    width = max(min(len(tok.encode(t)), 4) for t in texts[0])
    assert out.shape == (2, 4, width)
    for f, text in enumerate(texts[0]):
        ids = [100 + i for i in tok.encode(text)[:4]] if text else []
        assert out[0, f].tolist() == ids + [PAD] * (width - len(ids))
    assert (out[1] == PAD).all()  # an item with no words at all
    whole = item_words(pa.Table.from_pylist(ITEMS), KEYS, tok, 100, min_band_items=3)
    assert whole.shape[:2] == (4, 4) and whole[1, 2, 0] == 100 + tok.encode("premium")[0]


def test_terms_per_table_row_are_the_distinctive_title_words_critiques_name() -> None:
    """200 titles of three words from a pool of 60 (each word in about 10 titles: distinctive, not
    rare), two in three also "red": every row of the table holds its item's allowed terms, rarest
    first, then its colour, in subwords."""
    rng = random.Random(0)
    pool = [f"{a}{b}" for a in ("wood", "felt", "zinc", "silk", "clay", "jade") for b in "aeiouyrstl"]
    rows = [{"service": "s", "item_id": f"z{i}", "title": " ".join(rng.sample(pool, 3)) + (" red" if i % 3 else ""),
             "categories": [], "brand": None, "price": None} for i in range(200)]  # fmt: skip
    items = pa.Table.from_pylist(rows)
    tok = train_tokenizer([r["title"] for r in rows], 300)
    keys = [("s", f"z{i}") for i in rng.sample(range(200), 200)]
    out = item_terms(items, keys, tok, 100)
    attrs = service_attributes(items, "s")
    terms = [[*attrs.terms[attrs.row[item]], *([attrs.colour[attrs.row[item]]] if attrs.colour[attrs.row[item]] else [])]
             for _, item in keys]  # fmt: skip
    assert sum(t[-1:] == ["red"] for t in terms) == 133  # the colour word last, where the title has one
    assert out.shape[1] == max(len(t) for t in terms) >= 2
    for n, named in enumerate(terms):
        for k in range(out.shape[1]):
            ids = [100 + i for i in tok.encode(named[k])] if k < len(named) else []
            assert out[n, k].tolist() == ids + [PAD] * (out.shape[2] - len(ids))
