"""SID table: lookups both ways, save/load round trip, clear errors."""

from __future__ import annotations

import pytest
import torch

from moe_rec.sid.io import SIDFileError
from moe_rec.sid.table import META_FILE, TABLE_FILE, SIDTable, UnknownItemError
from moe_rec.sid.trie import UnknownServiceError


def make_table(n: int = 300, seed: int = 0) -> SIDTable:
    g = torch.Generator().manual_seed(seed)
    services = ["food" if i % 4 else "books" for i in range(n)]
    item_ids = [f"id-{(i * 7919) % 100_003}" for i in range(n)]
    codes = torch.cat([torch.randint(0, 32, (n, 3), generator=g), torch.zeros(n, 1, dtype=torch.long)], 1)
    seen: dict[tuple, int] = {}
    for i, (s, row) in enumerate(zip(services, codes.tolist(), strict=True)):  # make full IDs unique
        key = (s, *row[:3])
        codes[i, 3] = seen.get(key, 0)
        seen[key] = int(codes[i, 3]) + 1
    return SIDTable(
        services=services, item_ids=item_ids, codes=codes, codebook_size=32, max_dedup=8, quantizer="q"
    )


def test_lookups_both_ways() -> None:
    t = make_table()
    rows = torch.randperm(len(t), generator=torch.Generator().manual_seed(1))[:50]
    services = [t.services[s] for s in t.service_index[rows].tolist()]
    ids = t.item_ids[rows.numpy()].tolist()
    assert torch.equal(t.codes_for(services, ids), t.codes[rows])
    assert t.item_ids_for(services, t.codes[rows]) == ids
    assert torch.equal(t.rows_for_codes(services, t.codes[rows]), rows)
    food = [i for i in range(len(t)) if t.services[t.service_index[i]] == "food"][:5]
    assert torch.equal(t.codes_for("food", t.item_ids[food].tolist()), t.codes[food])
    missing = t.codes[rows[:3]].clone()
    missing[:, 0] = 40  # outside the codebook
    assert t.rows_for_codes(services[:3], missing).tolist() == [-1, -1, -1]


def test_vocabulary_and_code_map_agree_with_lookups() -> None:
    t = make_table()
    vocab = t.vocabulary()
    assert (vocab.services, vocab.levels, vocab.codebook_size, vocab.dedup_size) == (
        ("books", "food"),
        3,
        32,
        8,
    )
    mapping = t.code_map()
    assert len(mapping) == len(t)
    for service, item in list(mapping)[:20]:
        assert list(mapping[service, item]) == t.codes_for(service, [item])[0].tolist()
        vocab.item_tokens(service, mapping[service, item])  # every code fits the vocabulary


def test_unknown_item_and_service() -> None:
    t = make_table()
    with pytest.raises(UnknownItemError, match="'no-such-item'"):
        t.codes_for("food", ["no-such-item"])
    with pytest.raises(UnknownServiceError, match="'music'"):
        t.codes_for("music", [t.item_ids[0]])
    with pytest.raises(UnknownItemError, match="name no item"):
        t.item_ids_for("food", torch.full((1, 4), 31))


def test_duplicate_items_or_ids_are_rejected() -> None:
    codes = torch.tensor([[0, 0], [1, 0]])
    with pytest.raises(ValueError, match="appears"):
        SIDTable(services=["a", "a"], item_ids=["x", "x"], codes=codes, codebook_size=2, max_dedup=1)
    with pytest.raises(ValueError, match="share a full semantic ID"):
        SIDTable(
            services=["a", "a"],
            item_ids=["x", "y"],
            codes=codes[:1].repeat(2, 1),
            codebook_size=2,
            max_dedup=1,
        )


def test_save_load_round_trip(tmp_path) -> None:
    t = make_table()
    t.save(tmp_path)
    loaded = SIDTable.load(tmp_path)
    assert torch.equal(loaded.codes, t.codes)
    assert loaded.item_ids.tolist() == t.item_ids.tolist()
    assert loaded.services == t.services and loaded.metadata() == t.metadata()
    assert torch.equal(loaded.trie().prefixes[-1], t.trie().prefixes[-1])


def test_corrupt_or_missing_files(tmp_path) -> None:
    make_table().save(tmp_path)
    raw = bytearray((tmp_path / TABLE_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / TABLE_FILE).write_bytes(bytes(raw))
    with pytest.raises(SIDFileError, match="checksum"):
        SIDTable.load(tmp_path)
    (tmp_path / TABLE_FILE).unlink()
    with pytest.raises(SIDFileError, match="not found"):
        SIDTable.load(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(SIDFileError, match="not valid JSON"):
        SIDTable.load(tmp_path)
