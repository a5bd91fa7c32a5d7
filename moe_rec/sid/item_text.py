"""One string per catalogue row, the text encoder's input.

The semantic ID of an item is learned from this text alone, so it holds everything the catalogue
knows that says what the item *is*: title, category path, brand, price and free text. Missing or
empty fields are left out (no ``"Brand: None"``), so two items differ in text only where their
data differ. The format is fixed: changing it changes every embedding (the cache keys on the text).

A catalogue may bring its own text instead (the ``item_text`` column, e.g. a description written
for search): a row that has one is encoded as is, character for character, and its other fields
are not added to it; rows without one are composed as above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

CATEGORY_SEPARATOR = " > "


def _clean(value: str | None) -> str:
    return " ".join(value.split()) if value else ""


def compose_text(
    title: str | None = None,
    categories: Sequence[str | None] | None = None,
    brand: str | None = None,
    price: float | None = None,
    text: str | None = None,
) -> str:
    """``"<title>. Category: a > b. Brand: x. Price: 5.04. <text>"`` with missing fields skipped."""
    parts = []
    if title := _clean(title):
        parts.append(title.rstrip("."))
    path = [c for c in (_clean(c) for c in categories or ()) if c]
    if path:
        parts.append("Category: " + CATEGORY_SEPARATOR.join(path))
    if brand := _clean(brand):
        parts.append(f"Brand: {brand}")
    if price is not None and math.isfinite(price) and price >= 0:
        parts.append(f"Price: {price:.2f}")
    if text := _clean(text):
        parts.append(text.rstrip("."))
    return ". ".join(parts) + ("." if parts else "")


def item_texts(items: pa.Table) -> list[str]:
    """The encoder's text of every row of a catalogue table (ITEM_SCHEMA columns; absent columns are
    skipped): the row's ``item_text`` as is when it has a non-empty one, else the composed fields.

    Returns:
        ``N`` strings, in row order.
    """
    n = items.num_rows

    def column(name: str) -> list:
        return items.column(name).to_pylist() if name in items.column_names else [None] * n

    return [
        given if given and given.strip() else compose_text(title, categories, brand, price, text)
        for given, title, categories, brand, price, text in zip(
            column("item_text"),
            column("title"),
            column("categories"),
            column("brand"),
            column("price"),
            column("text"),
            strict=True,
        )
    ]
