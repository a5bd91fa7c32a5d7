"""Structure measures on a hand-made table, against values worked out by hand."""

import math

import pyarrow as pa
import pytest

from moe_rec.data import structure


def _events(rows: list[tuple[str, str, str]]) -> pa.Table:
    users, services, items = zip(*rows)
    return pa.table({"user": list(users), "service": list(services), "item_id": list(items)})


EVENTS = _events(
    [
        ("u1", "g", "a"), ("u1", "g", "a"), ("u1", "g", "b"), ("u1", "g", "a"),  # 2 repeats of 3
        ("u2", "g", "c"), ("u2", "g", "d"),  # 0 of 1
        ("u1", "m", "x"), ("u2", "m", "y"), ("u3", "m", "x"),
    ]
)  # fmt: skip


def test_repeat_rate_and_services_per_user() -> None:
    hist = structure.histories(EVENTS)
    assert hist[("u1", "g")] == ["a", "a", "b", "a"]
    assert structure.repeat_rate(hist, "g") == pytest.approx(2 / 4)
    assert structure.repeat_rate(hist, "m") == 0.0
    assert structure.services_per_user(EVENTS) == {2: 2, 1: 1}


def test_top_shares() -> None:
    # 20 items: one has 81 events, the rest one each -> top 10% (2 items) hold 82 of 100, top 1% (0 items) none
    rows = [("u", "g", "hot")] * 81 + [("u", "g", f"i{k}") for k in range(19)]
    top10, top1 = structure.top_shares(_events(rows))
    assert (top10, top1) == (pytest.approx(0.82), 0.0)


def test_taste_similarity_against_hand_cosines() -> None:
    items = pa.table(
        {
            "service": ["g", "g", "m", "m"],
            "item_id": ["a", "b", "x", "y"],
            "categories": [["Pets"], ["Baby"], ["Pets"], ["Baby"]],
        }
    )
    events = _events(
        [("u1", "g", "a"), ("u1", "m", "x"), ("u2", "g", "a"), ("u2", "g", "b"), ("u2", "m", "y")]
    )
    same, other, users = structure.taste_similarity(events, items, "g", "m")
    # u1: g=(Baby 0, Pets 1) m=(0, 1) -> 1; u2: g=(1, 1)/sqrt2, m=(1, 0) -> 1/sqrt2
    assert users == 2 and same == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    # strangers: u1's g with u2's m -> 0; u2's g with u1's m -> 1/sqrt2
    assert other == pytest.approx((0 + 1 / math.sqrt(2)) / 2)
