"""The words of every catalogue item, as the subword tokens a critique is written in: what the
item-level model's ``item_words`` term matches a critique against (:mod:`moe_rec.model.item_model`).

An item's words are four fields, each tokenised on its own with the run's text tokenizer
(``sequences/tokenizer.json``) and cut at ``slots`` subwords: its brand, its leaf category, its
price band's name ("budget", "mid-price", "premium", as the critiques name bands) and its title
(its keyword text where it has none). A critique that names a brand or a category ("anything by
Maybelline?", "something in lip gloss") then shares subwords with exactly the items it asks for,
through the one embedding table both are read with. An item's terms (:func:`item_terms`: its
distinctive title words and its colour, what a critique names as terms or colour) are a table of
their own, matched as whole phrases by ``item_terms``. Attributes come from
:func:`moe_rec.data.item_attributes.service_attributes`, as the critiques were built.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import pyarrow as pa
import torch

from moe_rec.data.item_attributes import SIZE_WORDS, ItemAttributes, Size, service_attributes
from moe_rec.data.text_tokenizer import TextTokenizer
from moe_rec.data.vocab import PAD

WORD_FIELDS = ("brand", "category", "band", "title")  # the fields of an item's words, in this order
WORD_SLOTS = 16  # subwords kept per field at most (a title's first ones: the product name)
TERM_SUBWORDS = 4  # subwords kept per distinctive term at most
# the size grid of ``item_amounts``: amounts (ounce-equivalents) and counts on a log grid of this step
# (half the critiques' default size ratio of 1.2, so "bigger by the ratio" is about two bins up),
# clipped to these ranges; size words by their rank
SIZE_STEP = math.log(1.2) / 2
SIZE_RANGES = {"amount": (0.05, 500.0), "count": (1.0, 5000.0)}
SIZE_BLOCKS = (  # bins per size kind, in this order: amount, count, word
    *(math.ceil(math.log(hi / lo) / SIZE_STEP) + 1 for lo, hi in SIZE_RANGES.values()),
    max(SIZE_WORDS.values()) + 1,
)
PACK_BINS = 25  # pack counts 1 .. 24 each their own bin, 25 and more the last


def item_word_texts(
    items: pa.Table, keys: Sequence[tuple[str, str]], num_bands: int, min_band_items: int
) -> list[list[str]]:
    """Per ``(service, item_id)`` of ``keys`` (the SID table's rows, in order), the text of each of
    :data:`WORD_FIELDS` ("" where unknown)."""
    return [
        [a.brand[i] or "", a.leaf(i) or "", a.band_name(a.band[i]) or "", a.title[i] or ""]
        for a, i in _attribute_rows(items, keys, num_bands, min_band_items)
    ]


def _attribute_rows(
    items: pa.Table, keys: Sequence[tuple[str, str]], num_bands: int, min_band_items: int
) -> list[tuple[ItemAttributes, int]]:
    """Per ``(service, item_id)`` of ``keys`` its service's attributes and its row there (each
    service's attributes read once)."""
    attrs = {
        s: service_attributes(items, s, num_bands=num_bands, min_band_items=min_band_items)
        for s in dict.fromkeys(s for s, _ in keys)
    }
    return [(attrs[s], attrs[s].row[item]) for s, item in keys]


def encode_item_words(
    texts: list[list[str]], tokenizer: TextTokenizer, text_offset: int, slots: int = WORD_SLOTS
) -> torch.Tensor:
    """(N, F, L) vocabulary ids of each item's F texts (its fields, :func:`item_word_texts`, or its
    terms), each cut at ``slots`` subwords and ``[PAD]``-filled; L is the longest text kept and F
    the most texts an item has (each at least 1)."""
    encoded = [[tokenizer.encode(t)[:slots] if t else [] for t in fields] for fields in texts]
    width = max([len(ids) for fields in encoded for ids in fields] + [1])
    count = max([len(fields) for fields in texts] + [1])
    out = torch.full((len(texts), count, width), PAD, dtype=torch.long)
    for n, fields in enumerate(encoded):
        for f, ids in enumerate(fields):
            if ids:
                out[n, f, : len(ids)] = torch.tensor(ids) + text_offset
    return out


def item_words(
    items: pa.Table,
    keys: Sequence[tuple[str, str]],
    tokenizer: TextTokenizer,
    text_offset: int,
    *,
    num_bands: int = 3,
    min_band_items: int = 20,
) -> torch.Tensor:
    """(N, F, L) the words of the items ``keys`` (``(service, item_id)`` of each SID-table row, in
    order) (module docstring)."""
    texts = item_word_texts(items, keys, num_bands, min_band_items)
    return encode_item_words(texts, tokenizer, text_offset)


def item_terms(
    items: pa.Table,
    keys: Sequence[tuple[str, str]],
    tokenizer: TextTokenizer,
    text_offset: int,
    *,
    num_bands: int = 3,
    min_band_items: int = 20,
) -> torch.Tensor:
    """(N, K, L) the words a critique names of the items ``keys``: their distinctive title terms
    (rarest first, as :func:`moe_rec.data.item_attributes.service_attributes` allows them and the
    critiques name them), then their colour word where they have one, each cut at
    :data:`TERM_SUBWORDS` subwords; K the most an item has."""
    texts = [
        [*a.terms[i], *([a.colour[i]] if a.colour[i] else [])]
        for a, i in _attribute_rows(items, keys, num_bands, min_band_items)
    ]
    return encode_item_words(texts, tokenizer, text_offset, TERM_SUBWORDS)


def price_bins(prices: Sequence[float | None], num_bins: int) -> list[int]:
    """Each price's quantile bin among ``prices`` (one service's): ``floor(Q x share of the prices
    strictly below it)``, so 0 (cheapest) .. Q - 1, equal prices in one bin and a higher price never
    in a lower bin; -1 without a price."""
    known = sorted(p for p in prices if p is not None)
    out = []
    for p in prices:
        if p is None:
            out.append(-1)
            continue
        below = bisect.bisect_left(known, p)
        out.append(min(num_bins - 1, num_bins * below // len(known)))
    return out


def item_price_bins(
    items: pa.Table,
    keys: Sequence[tuple[str, str]],
    num_bins: int,
    *,
    num_bands: int = 3,
    min_band_items: int = 20,
) -> torch.Tensor:
    """(N,) the price bin (:func:`price_bins`, among the prices of the item's service) of each
    ``(service, item_id)`` of ``keys`` (the SID table's rows, in order); -1 without a price: what the
    item-level model's ``item_price_bins`` term reads."""
    rows = _attribute_rows(items, keys, num_bands, min_band_items)
    services = {id(a): a for a, _ in rows}
    bins = {key: price_bins(a.price, num_bins) for key, a in services.items()}  # each service's once
    return torch.tensor([bins[id(a)][i] for a, i in rows], dtype=torch.long)


def size_bin(size: Size | None) -> int:
    """The bin of a size on the grid of :data:`SIZE_BLOCKS` (the kinds' blocks one after another): an
    amount's or count's ``floor(log(value / low) / SIZE_STEP)`` within its range (ends clipped), a size
    word's rank; -1 without a size."""
    if size is None:
        return -1
    if size.kind == "word":
        return SIZE_BLOCKS[0] + SIZE_BLOCKS[1] + int(size.value)
    lo, _ = SIZE_RANGES[size.kind]
    offset = 0 if size.kind == "amount" else SIZE_BLOCKS[0]
    width = SIZE_BLOCKS[0 if size.kind == "amount" else 1]
    step = math.floor(math.log(max(size.value, lo) / lo) / SIZE_STEP)
    return offset + min(step, width - 1)


def pack_bin(pack: int | None) -> int:
    """The bin of a pack count: ``count - 1`` up to :data:`PACK_BINS` - 1; a pack never stated is one
    (bin 0), as the critiques read it."""
    return min(pack or 1, PACK_BINS) - 1


def item_amount_bins(
    items: pa.Table,
    keys: Sequence[tuple[str, str]],
    *,
    num_bands: int = 3,
    min_band_items: int = 20,
) -> torch.Tensor:
    """(N, 2) per ``(service, item_id)`` of ``keys`` (the SID table's rows, in order) its size bin
    (:func:`size_bin`, -1 without a size) and pack bin (:func:`pack_bin`): what the item-level
    model's ``item_amounts`` term reads."""
    rows = [
        (size_bin(a.size[i]), pack_bin(a.pack[i]))
        for a, i in _attribute_rows(items, keys, num_bands, min_band_items)
    ]
    return torch.tensor(rows, dtype=torch.long).reshape(len(keys), 2)
