"""The cold-start benchmark's item pick, its record, and what training and the baselines leave out."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from moe_rec.data.cold_start import (
    COLD_FILE,
    cold_labels,
    drop_cold_training,
    is_cold,
    pick_cold_items,
    read_cold_items,
    write_cold_items,
)
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import Event, SequenceBuilder, SequenceConfig
from moe_rec.data.vocab import Vocabulary

ITEMS = [(s, f"item{i}") for s in ("beauty", "toys") for i in range(5000)]


def test_the_pick_is_about_the_share_and_the_same_every_time() -> None:
    cold = pick_cold_items(ITEMS, 0.1)
    assert 0.09 < len(cold) / len(ITEMS) < 0.11
    assert cold == pick_cold_items(list(reversed(ITEMS)), 0.1)  # a function of the item alone
    assert pick_cold_items(ITEMS, 0.0) == set()
    assert cold < pick_cold_items(ITEMS, 0.2)  # a larger share keeps the smaller one's items cold
    assert all(is_cold(s, i, 0.1) == ((s, i) in cold) for s, i in ITEMS[:200])


def test_record_round_trip_and_a_damaged_record_is_named(tmp_path: Path) -> None:
    cold = pick_cold_items(ITEMS, 0.05)
    write_cold_items(tmp_path, 0.05, cold)
    assert read_cold_items(tmp_path) == cold
    write_cold_items(tmp_path, 0.0, set())  # share 0 removes a stale record
    assert not (tmp_path / COLD_FILE).exists() and read_cold_items(tmp_path) == set()
    (tmp_path / COLD_FILE).write_text('{"share": 0.1, "items": [["beauty"]]}')
    with pytest.raises(DataError, match=COLD_FILE):
        read_cold_items(tmp_path)


def test_drop_cold_training_keeps_every_held_out_event() -> None:
    rows = [
        ("u1", "beauty", "a", "train"), ("u1", "beauty", "b", "train"), ("u1", "beauty", "a", "test"),
        ("u2", "toys", "a", "train"), ("u2", "toys", "c", "valid"), ("u2", "beauty", "b", "valid"),
    ]  # fmt: skip
    events = pa.table(
        {k: [r[i] for r in rows] for i, k in enumerate(("user", "service", "item_id", "split"))}
    )
    cold = {("beauty", "a"), ("toys", "c")}
    kept = drop_cold_training(events, cold).to_pylist()
    expected = [r for r in rows if not ((r[1], r[2]) in cold and r[3] == "train")]
    assert [(r["user"], r["service"], r["item_id"], r["split"]) for r in kept] == expected
    assert drop_cold_training(events, set()) is events
    assert cold_labels(["beauty", "toys"], ["a", "a"], cold) == ["cold", "warm"]
    assert cold_labels(["beauty"], ["a"], set()) is None


def test_training_windows_leave_out_cold_items_and_held_out_samples_keep_them() -> None:
    vocab = Vocabulary(["beauty", "toys"], levels=2, codebook_size=4, dedup_size=2)
    items = {("beauty", f"b{i}"): (i % 4, i // 4 % 4, 0) for i in range(12)}
    items |= {("toys", f"t{i}"): (i % 4, (i + 1) % 4, 1) for i in range(12)}
    share = 0.35
    cold = pick_cold_items(items, share)
    assert cold and len(cold) < len(items)
    # timed events: their order does not depend on which others are left out
    events = [Event("beauty", f"b{i}", 10 * i, i, "train") for i in range(10)]
    events += [Event("toys", f"t{i}", 10 * i + 5, i, "train") for i in range(10)]
    events += [Event("beauty", "b10", 100, 10, "valid"), Event("beauty", "b11", 110, 11, "test")]
    with_cold = SequenceBuilder(vocab, items, SequenceConfig(train_stride=3, cold_items=share))
    plain = SequenceBuilder(vocab, items, SequenceConfig(train_stride=3))
    warm_events = [e for e in events if (e.service, e.item_id) not in cold]
    assert list(with_cold.train_samples("u", events)) == list(plain.train_samples("u", warm_events))
    for split in ("valid", "test"):
        assert list(with_cold.eval_samples("u", events, split)) == list(
            plain.eval_samples("u", events, split)
        )
    with pytest.raises(ValueError, match="cold_items"):
        SequenceConfig(cold_items=1.0)
