"""The most-popular baseline on a hand-made events table: the ranking (counts, ties by id, exclusion),
the requests of a split, and Recall@K / NDCG@K worked out by hand, with and without the history
excluded; a prepared directory gives the same numbers; on the real Amazon 2014 data (when present)
the numbers are in the range a popularity baseline reaches."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from moe_rec.data.schema import EVENT_SCHEMA
from moe_rec.data.store import write_events
from moe_rec.eval.popularity import MostPopular, build_requests, evaluate_events, evaluate_popularity

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# user -> service -> (items, splits); leave-one-out: last test, second to last valid
HISTORIES = {
    "u1": {"a": ("p q r s", "train train valid test"), "b": ("m n m x", "train train valid test")},
    "u2": {"a": ("p r q p", "train train valid test"), "b": ("m n", "train test")},
    "u3": {"a": ("p q r s r", "train train train valid test")},
    "u4": {"a": ("s q", "train test")},
}
# training counts: a: p 3, q 2, r 2, s 1 -> p q r s (q before r by id); b: m 2, n 1 -> m n


def events_table() -> pa.Table:
    rows = []
    for user, services in HISTORIES.items():
        for service, (items, splits) in services.items():
            for position, (item, split) in enumerate(zip(items.split(), splits.split())):
                rows.append(
                    {"user": user, "service": service, "item_id": item, "timestamp": None,
                     "position": position, "split": split, "event_type": "review", "quantity": None,
                     "price": None}
                )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def ndcg(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def test_ranking_by_count_then_item_id() -> None:
    events = events_table()
    model = MostPopular().fit(events.filter(pc.equal(events.column("split"), "train")))
    assert model.ranking == {"a": ["p", "q", "r", "s"], "b": ["m", "n"]}
    assert model.rank(["a", "b", "unknown"], 2) == [["p", "q"], ["m", "n"], []]
    assert model.rank(["a", "a", "b"], 2, exclude=[{"p"}, {"q", "s"}, set()]) == [
        ["q", "r"],
        ["p", "r"],
        ["m", "n"],
    ]
    assert model.rank(["a"], 3, exclude=[{"p", "q", "r"}]) == [["s"]]  # fewer than k left
    with pytest.raises(ValueError, match="exclusion sets"):
        model.rank(["a"], 3, exclude=[])


def test_requests_carry_the_earlier_events_of_their_service() -> None:
    requests = {(r.user, r.service): r for r in build_requests(events_table(), "test")}
    assert len(requests) == 6
    assert requests["u1", "a"].target == "s" and requests["u1", "a"].history == {"p", "q", "r"}
    assert requests["u2", "b"].target == "n" and requests["u2", "b"].history == {"m"}
    valid = build_requests(events_table(), "valid")
    assert {(r.user, r.service, r.target) for r in valid} == {
        ("u1", "a", "r"), ("u2", "a", "q"), ("u3", "a", "s"), ("u1", "b", "m"),
    }  # fmt: skip
    with pytest.raises(ValueError, match="split"):
        build_requests(events_table(), "train")


def test_test_split_metrics_by_hand() -> None:
    # ranks of the test targets: a: u1 s 4, u2 p 1, u3 r 3, u4 q 2; b: u1 x absent, u2 n 2
    r = evaluate_events(events_table(), "test", ks=(1, 3))
    assert r["test/a/recall@1"] == pytest.approx(1 / 4)
    assert r["test/a/recall@3"] == pytest.approx(3 / 4)
    assert r["test/a/ndcg@3"] == pytest.approx((ndcg(1) + ndcg(3) + ndcg(2)) / 4)
    assert r["test/b/recall@1"] == 0.0 and r["test/b/recall@3"] == pytest.approx(1 / 2)
    assert r["test/b/ndcg@3"] == pytest.approx(ndcg(2) / 2)
    assert r["test/recall@3"] == pytest.approx(4 / 6)
    assert r["test/ndcg@3"] == pytest.approx((ndcg(1) + ndcg(3) + 2 * ndcg(2)) / 6)
    assert r["test/macro/recall@3"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert r["test/count"] == 6 and r["test/a/count"] == 4


def test_excluding_the_history_by_hand() -> None:
    # a: u1 ranks [s] -> 1; u2 [s] misses p; u3 nothing is left; u4 [p q r] -> 2; b: u1 absent, u2 [n] -> 1
    r = evaluate_events(events_table(), "test", exclude_seen=True, ks=(1, 3))
    assert r["test/a/recall@1"] == pytest.approx(1 / 4)
    assert r["test/a/recall@3"] == pytest.approx(2 / 4)
    assert r["test/a/ndcg@3"] == pytest.approx((ndcg(1) + ndcg(2)) / 4)
    assert r["test/b/recall@1"] == pytest.approx(1 / 2)
    assert r["test/ndcg@3"] == pytest.approx((2 * ndcg(1) + ndcg(2)) / 6)


def test_valid_split_by_hand() -> None:
    # a: u1 r 3, u2 q 2, u3 s 4; b: u1 m 1
    r = evaluate_events(events_table(), "valid", ks=(1, 3))
    assert set(r) >= {"valid/recall@1", "valid/a/ndcg@3", "valid/b/count"}
    assert r["valid/recall@1"] == pytest.approx(1 / 4)
    assert r["valid/recall@3"] == pytest.approx(3 / 4)
    assert r["valid/a/ndcg@3"] == pytest.approx((ndcg(3) + ndcg(2)) / 3)


def test_prepared_directory_gives_the_same_numbers(tmp_path: Path) -> None:
    write_events(events_table(), tmp_path, num_shards=2)
    assert evaluate_popularity(tmp_path, "test") == evaluate_events(events_table(), "test")


@pytest.mark.slow
@pytest.mark.real_data
def test_real_amazon2014_popularity(tmp_path: Path) -> None:
    """The baseline on the published split: far below the learned models of the README's table."""
    if not (REAL_DATA / "amazon2014").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA / 'amazon2014'}")
    from moe_rec.data.config import DataConfig
    from moe_rec.data.sources import amazon2014

    events, *_ = amazon2014.read(DataConfig(source="amazon2014", path=REAL_DATA / "amazon2014"))
    r = evaluate_events(events, "test")
    assert (
        r["test/beauty/count"] == 22_363
        and r["test/sports/count"] == 35_598
        and r["test/toys/count"] == 19_412
    )
    for service in ("beauty", "sports", "toys"):
        assert 0.0 < r[f"test/{service}/recall@10"] < 0.03, service
        assert r[f"test/{service}/ndcg@10"] < r[f"test/{service}/recall@10"], service
