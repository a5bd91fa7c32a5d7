"""build_sids end to end on a tiny two-service catalogue with the real MiniLM encoder."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from moe_rec.data.schema import ITEM_SCHEMA, DataError
from moe_rec.sid.build import STATS_FILE, TEXT_FILE, build_sids, table_text_embeddings
from moe_rec.sid.config import SIDConfig
from moe_rec.sid.embed import TextEncoder
from moe_rec.sid.item_text import item_texts
from moe_rec.sid.quantizer import load_quantizer
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import TRIE_FILE, SIDTrie


def catalogue() -> pa.Table:
    kinds = [("lipstick", ["Beauty", "Makeup", "Lips"]), ("shampoo", ["Beauty", "Hair", "Shampoo"])]
    rows = []
    for i in range(48):
        noun, cats = kinds[i % 2]
        rows.append(
            {
                "service": "market" if i < 32 else "grocery",
                "item_id": f"{i:03d}",
                "title": f"{['red', 'blue', 'green'][i % 3]} {noun}" if i % 5 else "same title",  # duplicates
                "categories": cats,
                "brand": None if i % 4 else "Acme",
                "price": float(i),
                "text": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def test_build_writes_a_consistent_stage(tmp_path) -> None:
    items = catalogue()
    cfg = SIDConfig(levels=2, codebook_size=4, max_dedup=32)
    stats = build_sids(items, cfg, tmp_path / "sid", cache_dir=tmp_path / "cache")
    assert stats["items"] == stats["unique_ids"] == 48
    assert stats["encoder"]["texts_encoded"] > 0
    assert json.loads((tmp_path / "sid" / STATS_FILE).read_text()) == stats

    table = SIDTable.load(tmp_path / "sid")
    trie = SIDTrie.load(tmp_path / "sid" / TRIE_FILE)
    services = items.column("service").to_pylist()
    codes = table.codes_for(services, items.column("item_id").to_pylist())
    assert bool(trie.contains(services, codes).all())
    quantizer = load_quantizer(tmp_path / "sid")
    assert (quantizer.levels, quantizer.codebook_size) == (2, 4)

    again = build_sids(items, cfg, tmp_path / "sid", cache_dir=tmp_path / "cache")
    assert again["encoder"]["texts_encoded"] == 0
    assert torch.equal(SIDTable.load(tmp_path / "sid").codes, table.codes)


def test_items_without_text_are_named_by_their_id(tmp_path) -> None:
    n = 24
    items = pa.table(
        {
            "service": ["food"] * n,
            "item_id": [f"B{i:05d}" for i in range(n)],
            "title": [None] * n,
            "text": [""] * n,
        }
    )
    stats = build_sids(
        items, SIDConfig(levels=2, codebook_size=4, max_dedup=n), tmp_path / "sid", tmp_path / "cache"
    )
    assert stats["items_without_text"] == n
    assert stats["unique_ids"] == n
    # distinct stand-in texts give distinct embeddings, so items spread over codes instead of all colliding
    assert stats["unique_prefixes"] > 1


def test_text_embeddings_follow_table_rows_and_refuse_other_data(tmp_path) -> None:
    """Each SID-table row gets its own item's text vector; a table built for another catalogue
    (here: one service of it only) is a clear data error, not a crash deep in training."""
    items = catalogue()
    cfg = SIDConfig(levels=2, codebook_size=4, max_dedup=32)
    build_sids(items, cfg, tmp_path / "sid", cache_dir=tmp_path / "cache")
    table = SIDTable.load(tmp_path / "sid")
    vectors = table_text_embeddings(items, table, cfg, tmp_path / "cache")
    rows = table.rows(items.column("service").to_pylist(), items.column("item_id").to_pylist())
    shuffled = items.take(list(reversed(range(items.num_rows))))
    again = table_text_embeddings(shuffled, table, cfg, tmp_path / "cache")
    assert torch.equal(vectors, again)  # by table row, whatever the catalogue's order
    assert not torch.equal(vectors[rows[0]], vectors[rows[1]])  # different titles, different rows

    market = items.filter(pc.equal(items.column("service"), "market"))
    with pytest.raises(DataError, match="32 items but the SID table 48"):
        table_text_embeddings(market, table, cfg, tmp_path / "cache")


def test_training_reads_the_stage_text_embeddings_without_an_encoder(tmp_path) -> None:
    """build_sids stores each table row's text vector (half precision); read back with an encoder
    that cannot load (a GPU node without the model package) they equal the encoded vectors rounded
    to half precision, row for row; a file of other SIDs is refused by name."""
    items = catalogue()
    cfg = SIDConfig(levels=2, codebook_size=4, max_dedup=32)
    build_sids(items, cfg, tmp_path / "sid", cache_dir=tmp_path / "cache")
    table = SIDTable.load(tmp_path / "sid")
    encoded = table_text_embeddings(items, table, cfg, tmp_path / "cache")  # no sid_dir: the encoder
    raw = TextEncoder.from_config(cfg.encoder, tmp_path / "cache").encode(item_texts(items))
    rows = table.rows(items.column("service").to_pylist(), items.column("item_id").to_pylist())
    expected = torch.empty_like(encoded)
    for i, row in enumerate(rows.tolist()):  # a plain loop over the catalogue's rows
        expected[row] = raw[i].to(torch.float16).to(torch.float32)
    assert torch.equal(encoded, expected)

    offline = SIDConfig(
        levels=2, codebook_size=4, max_dedup=32, encoder={"model": str(tmp_path / "no-model")}
    )
    read = table_text_embeddings(items, table, offline, tmp_path / "empty-cache", tmp_path / "sid")
    assert read.dtype == torch.float32 and torch.equal(read, expected)
    assert not (tmp_path / "empty-cache").exists()  # nothing encoded

    other = tmp_path / "other"
    build_sids(items.slice(0, 40), cfg, other, cache_dir=tmp_path / "cache")
    (tmp_path / "sid" / TEXT_FILE).write_bytes((other / TEXT_FILE).read_bytes())
    with pytest.raises(DataError, match="holds 40 items but the SID table 48"):
        table_text_embeddings(items, table, offline, tmp_path / "cache", tmp_path / "sid")
