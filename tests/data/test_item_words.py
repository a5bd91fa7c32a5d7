"""The item words the item model matches critiques against: each field of each catalogue item, in
SID-table row order, tokenised as critiques are, by hand."""

from __future__ import annotations

import math
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


def test_size_bins_put_sizes_of_one_kind_on_a_log_grid_and_kinds_apart() -> None:
    """size_bin by hand: amounts and counts on a grid of log(1.2) / 2 from their range's low end, a
    size 1.2 times another two bins above it, the ends clipped, counts after the amounts' block,
    words after the counts' by rank; pack_bin: the count less one, an unstated pack one, a cap."""
    from moe_rec.data.item_attributes import Size
    from moe_rec.data.item_words import PACK_BINS, SIZE_BLOCKS, SIZE_RANGES, SIZE_STEP, pack_bin, size_bin

    lo, hi = SIZE_RANGES["amount"]
    amount, count = SIZE_BLOCKS[0], SIZE_BLOCKS[1]
    assert size_bin(None) == -1
    assert size_bin(Size("amount", lo)) == 0 and size_bin(Size("amount", lo / 10)) == 0
    assert size_bin(Size("amount", 1e9)) == amount - 1
    one = size_bin(Size("amount", 1.0))
    assert one == math.floor(math.log(1.0 / lo) / SIZE_STEP)
    assert size_bin(Size("amount", 1.2 * 1.0001)) == one + 2
    assert size_bin(Size("amount", 1.05)) in (one, one + 1)
    assert size_bin(Size("count", 1.0)) == amount
    assert size_bin(Size("count", SIZE_RANGES["count"][1] * 2)) == amount + count - 1
    assert size_bin(Size("word", 0)) == amount + count and size_bin(Size("word", 5)) == sum(SIZE_BLOCKS) - 1
    assert [pack_bin(p) for p in (None, 1, 2, 24, 25, 1000)] == [0, 0, 1, 23, PACK_BINS - 1, PACK_BINS - 1]


def test_amount_bins_per_table_row_are_the_sizes_and_packs_critiques_compare() -> None:
    """item_amount_bins: each row's size bin and pack bin are those of the size and pack that
    service_attributes reads from the item's title (the critiques' reading), in the keys' order."""
    from moe_rec.data.item_words import item_amount_bins, pack_bin, size_bin

    titles = ["Shampoo 8 oz", "Shampoo 250ml Pack of 3", "Wipes 30 Count", "Travel size balm", "Argan oil",
              "Lotion 1.5 fl oz (2 Pack)", "Cream 50 g"]  # fmt: skip
    rows = [{"service": "s", "item_id": f"a{i}", "title": t, "categories": [], "brand": None, "price": None}
            for i, t in enumerate(titles)]  # fmt: skip
    items = pa.Table.from_pylist(rows)
    keys = [("s", f"a{i}") for i in (6, 0, 3, 1, 5, 2, 4)]
    out = item_amount_bins(items, keys)
    attrs = service_attributes(items, "s")
    assert out.shape == (7, 2)
    for n, (_, item) in enumerate(keys):
        i = attrs.row[item]
        assert out[n].tolist() == [size_bin(attrs.size[i]), pack_bin(attrs.pack[i])]
    assert out[6].tolist() == [-1, 0]  # "Argan oil": no size, a pack of one
    assert out[3, 1] == 2 and out[4, 1] == 1  # packs of 3 and 2
    assert out[1, 0] > out[0, 0] > out[4, 0]  # 8 oz > 50 g (1.76 oz) > 1.5 oz


def test_price_bins_per_table_row_are_each_services_quantile_bins() -> None:
    """item_price_bins in the keys' order: service s's prices 1, 2, 3 in two bins (share below x 2,
    floored: 0, 0, 1), service t's item without a price -1."""
    from moe_rec.data.item_words import item_price_bins

    out = item_price_bins(pa.Table.from_pylist(ITEMS), KEYS, 2, min_band_items=3)
    assert out.tolist() == [-1, 1, 0, 0]
