"""Parquet store: shards hold whole users, round trip through datasets, stats against a plain count."""

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_rec.data import store
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.schema import ITEM_SCHEMA, DataError, ReadReport


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_shards", [1, 3, 7, 50])
def test_shard_bounds_keep_users_whole(seed: int, num_shards: int) -> None:
    rng = random.Random(seed)
    users = sorted(f"u{rng.randrange(40):03d}" for _ in range(rng.randrange(1, 300)))
    bounds = store.shard_bounds_by_user(pa.array(users), num_shards)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(users)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, nothing lost
    assert len(bounds) <= num_shards
    owners: dict[str, set[int]] = {}
    for i, (lo, hi) in enumerate(bounds):
        assert hi > lo
        for u in users[lo:hi]:
            owners.setdefault(u, set()).add(i)
    assert all(len(s) == 1 for s in owners.values())
    if num_shards <= len(set(users)):
        assert len(bounds) >= min(num_shards, 2)


def _dataset(n_users: int = 30, seed: int = 0):
    rng = random.Random(seed)
    cat = CatalogueBuilder(["x", "y"], ReadReport("items"))
    for s in ("x", "y"):
        for i in range(10):
            cat.add(s, f"{s}{i}", "f:1", title=f"item {s}{i}")
    ev = EventBuilder(["x", "y"], cat.keys(), ReadReport("events"))
    rows = []
    for u in range(n_users):
        for _ in range(rng.randrange(1, 8)):
            s = rng.choice("xy")
            rows.append((f"user{u}", s, f"{s}{rng.randrange(10)}"))
            ev.add(*rows[-1], where="f:1")
    return ev.finish(), cat.finish(), rows


def test_round_trip_and_stats(tmp_path: Path) -> None:
    events, items, rows = _dataset()
    store.write_items(items, tmp_path)
    paths = store.write_events(events, tmp_path, num_shards=4)
    assert len(paths) == 4
    back = store.load_table(tmp_path)
    assert (
        back.sort_by([("user", "ascending")]).to_pylist()
        == events.sort_by([("user", "ascending")]).to_pylist()
    )
    stats = store.compute_stats(back, store.load_table(tmp_path, store.ITEMS_DIR))
    for s in ("x", "y"):  # plain counts from the raw rows
        assert stats["services"][s]["interactions"] == sum(r[1] == s for r in rows)
        assert stats["services"][s]["users"] == len({r[0] for r in rows if r[1] == s})
        assert stats["services"][s]["items"] == 10
    per_user = Counter()
    for u, _ in {(r[0], r[1]) for r in rows}:
        per_user[u] += 1
    assert stats["total"]["users_in_several_services"] == sum(c > 1 for c in per_user.values())
    assert len(store.load_events(tmp_path, split="test")) == sum(
        1 for u, s in {(r[0], r[1]) for r in rows} if sum(1 for r in rows if r[:2] == (u, s)) >= 2
    )


def test_missing_shards_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="moe-rec data prepare"):
        store.load_events(tmp_path)
    with pytest.raises(DataError, match="stats.json"):
        store.read_stats(tmp_path)


def test_a_catalogue_written_before_item_text_existed_still_loads(tmp_path: Path) -> None:
    _, items, _ = _dataset()
    old = items.drop_columns(["item_text"])
    (tmp_path / store.ITEMS_DIR).mkdir()
    pq.write_table(old, tmp_path / store.ITEMS_DIR / "part-00000.parquet")
    back = store.load_table(tmp_path, store.ITEMS_DIR)
    assert back.column_names == ITEM_SCHEMA.names and back.column("item_text").null_count == back.num_rows
    assert back.drop_columns(["item_text"]).to_pylist() == old.to_pylist()
    store.write_items(old, tmp_path / "again")  # a table without the column is written with nulls
    assert store.load_table(tmp_path / "again", store.ITEMS_DIR).to_pylist() == back.to_pylist()
