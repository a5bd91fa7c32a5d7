"""Composed item text: fields in a fixed order, missing ones skipped."""

from __future__ import annotations

import math

import pyarrow as pa

from moe_rec.data.schema import ITEM_SCHEMA
from moe_rec.sid.item_text import compose_text, item_texts


def test_all_fields() -> None:
    text = compose_text("Red  Lipstick.", ["Beauty", "Makeup"], "Acme", 9.5, "Long lasting.")
    assert text == "Red Lipstick. Category: Beauty > Makeup. Brand: Acme. Price: 9.50. Long lasting."


def test_missing_fields_are_skipped() -> None:
    assert compose_text("Soap", None, "", math.nan, None) == "Soap."
    assert compose_text(None, ["", "Bath"], None, None, "  ") == "Category: Bath."
    assert compose_text() == ""


def test_item_texts_reads_rows_in_order() -> None:
    rows = [
        {"service": "s", "item_id": "1", "title": "A", "brand": "B"},
        {"service": "s", "item_id": "2", "categories": ["C"], "price": 1.0, "text": "t"},
    ]
    table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
    assert item_texts(table) == ["A. Brand: B.", "Category: C. Price: 1.00. t."]
    assert item_texts(table.select(["service", "item_id", "title"])) == ["A.", ""]


def test_a_given_item_text_is_encoded_as_is() -> None:
    rows = [
        {
            "service": "s",
            "item_id": "1",
            "title": "A",
            "brand": "B",
            "item_text": "  Hand-written: A,  by B ",
        },
        {"service": "s", "item_id": "2", "title": "C", "item_text": "   "},  # blank: composed instead
        {"service": "s", "item_id": "3", "title": "D"},
    ]
    table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
    assert item_texts(table) == ["  Hand-written: A,  by B ", "C.", "D."]
