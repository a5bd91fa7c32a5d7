"""Semantic IDs of the real Amazon 2014 Beauty catalogue: the first code must know categories.

Skipped when ../shared/data is absent. Encoding 12k titles takes minutes on a small CPU, so the
embeddings are cached in pytest's cache directory and later runs take seconds.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pyarrow as pa
import pytest

from moe_rec.data.schema import ITEM_SCHEMA
from moe_rec.sid.build import build_sids
from moe_rec.sid.config import SIDConfig

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BEAUTY = SHARED_DATA / "amazon2014" / "beauty" / "items.tsv"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.slow,
    pytest.mark.skipif(not BEAUTY.exists(), reason=f"{BEAUTY} not present"),
]


def _categories(field: str) -> list[str] | None:
    try:
        return [c for c in ast.literal_eval(f"({field},)") if isinstance(c, str)] or None
    except (ValueError, SyntaxError):
        return None


def _float(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


def read_beauty() -> pa.Table:
    """A minimal reader of items.tsv (item_id, title, sales_type, sales_rank, categories, price, brand)."""
    with BEAUTY.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    records = [
        {
            "service": "beauty",
            "item_id": r[0],
            "title": r[1] or None,
            "categories": _categories(r[4]),
            "brand": r[6] or None,
            "price": _float(r[5]),
            "text": None,
        }
        for r in rows
        if len(r) == 7
    ]
    return pa.Table.from_pylist(records, schema=ITEM_SCHEMA)


def test_beauty_first_code_is_category_coherent(tmp_path, pytestconfig: pytest.Config) -> None:
    items = read_beauty()
    assert items.num_rows > 12_000
    cache = pytestconfig.cache.mkdir("sid_embedding_cache")
    stats = build_sids(items, SIDConfig(), tmp_path, cache_dir=cache)
    assert stats["unique_ids"] == stats["items"] == items.num_rows
    assert stats["category_coherence"]["ratio"] > 5  # random codes give about 1
    assert stats["collision_rate"] < 0.5
    assert all(level["used_frac"] > 0.9 for level in stats["codebook_usage"])
