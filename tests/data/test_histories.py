"""Tests of the rules every source shares: EventBuilder (order, duplicates, splits) and CatalogueBuilder."""

from __future__ import annotations

import random

import pytest

from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, DataError, ReadReport

SERVICES = ("a", "b")
CATALOGUE = {("a", f"i{k}") for k in range(10)} | {("b", f"j{k}") for k in range(10)}


def _builder(strict: bool = False) -> EventBuilder:
    return EventBuilder(SERVICES, CATALOGUE, ReadReport(source="test", strict=strict))


def test_splits_match_a_plain_loop(histories, expected_splits, assert_balanced) -> None:
    rng = random.Random(0)
    raw = []  # (user, service, item, timestamp); small time range: many ties and exact repeats
    for u in range(60):
        for service, prefix in (("a", "i"), ("b", "j")):
            for _ in range(rng.randint(0, 7)):
                raw.append((f"u{u:02d}", service, f"{prefix}{rng.randrange(6)}", rng.randrange(6)))
    rng.shuffle(raw)
    builder = _builder()
    for line, (user, service, item, ts) in enumerate(raw, start=1):
        builder.add(user, service, item, f"f:{line}", timestamp=ts)
    table = builder.finish()

    expected: dict[tuple[str, str], list[tuple[str, int]]] = {}
    by_key: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for index, (user, service, item, ts) in enumerate(raw):
        by_key.setdefault((user, service), []).append((ts, index, item))
    for key, events in by_key.items():
        seen: set[tuple[str, int]] = set()
        expected[key] = []
        for ts, _, item in sorted(events):  # by time, then source order
            if (item, ts) not in seen:
                seen.add((item, ts))
                expected[key].append((item, ts))

    got = histories(table)
    assert set(got) == set(expected)
    for key, rows in got.items():
        assert [(r["item_id"], r["timestamp"]) for r in rows] == expected[key]
        assert [r["position"] for r in rows] == list(range(len(rows)))
        assert [r["split"] for r in rows] == expected_splits(len(rows))
    report = builder.report
    assert report.rejected["duplicate_event"] == len(raw) - sum(len(v) for v in expected.values())
    assert report.notes["one_event_histories"] == sum(len(v) == 1 for v in expected.values())
    assert_balanced(report)


def test_table_is_grouped_by_sorted_user_with_the_event_schema() -> None:
    builder = _builder()
    for user, item, ts in [("u2", "i1", 1), ("u1", "i2", 1), ("u2", "i3", 2), ("u1", "i4", 2)]:
        builder.add(user, "a", item, "f:1", timestamp=ts)
    table = builder.finish()
    assert table.schema == EVENT_SCHEMA
    assert table.column("user").to_pylist() == ["u1", "u1", "u2", "u2"]


def test_out_of_order_timestamps_are_sorted_and_counted() -> None:
    builder = _builder()
    for item, ts in [("i1", 30), ("i2", 10), ("i3", 20)]:
        builder.add("u1", "a", item, "f:1", timestamp=ts)
    for item, ts in [("i1", 1), ("i2", 2)]:  # already in order: not counted
        builder.add("u2", "a", item, "f:1", timestamp=ts)
    rows = builder.finish().to_pylist()
    u1 = [(r["item_id"], r["split"]) for r in rows if r["user"] == "u1"]
    assert u1 == [("i2", "train"), ("i3", "valid"), ("i1", "test")]
    assert builder.report.notes["histories_reordered_by_timestamp"] == 1


def test_without_timestamps_source_order_and_repeats_are_kept() -> None:
    builder = _builder()
    for item in ["i3", "i1", "i3", "i2"]:
        builder.add("u1", "a", item, "f:1")
    rows = builder.finish().to_pylist()
    assert [r["item_id"] for r in rows] == ["i3", "i1", "i3", "i2"]
    assert [r["split"] for r in rows] == ["train", "train", "valid", "test"]
    assert builder.report.rows_rejected == 0


@pytest.mark.parametrize("strict", [False, True])
def test_one_event_history_is_train_only_and_counted(strict: bool) -> None:
    builder = _builder(strict)
    builder.add("u1", "a", "i1", "f:1", timestamp=5)
    builder.add("u1", "b", "j1", "f:2", timestamp=5)
    builder.add("u1", "b", "j2", "f:3", timestamp=6)
    rows = builder.finish().to_pylist()
    assert [(r["service"], r["split"]) for r in rows] == [("a", "train"), ("b", "train"), ("b", "test")]
    assert builder.report.notes["one_event_histories"] == 1


@pytest.mark.parametrize("strict", [False, True])
def test_expected_user_without_events_is_an_empty_history(strict: bool) -> None:
    builder = _builder(strict)
    builder.expect_users(["u1", "u2", "u3"])
    builder.add("u1", "a", "i1", "f:1")
    if not strict:
        builder.add("u3", "a", "not-an-item", "f:2")  # u3's only event is rejected: empty as well
    table = builder.finish()
    assert set(table.column("user").to_pylist()) == {"u1"}
    assert builder.report.notes["empty_histories"] == 2


# (adds as (user, service, item, where, timestamp), the reason the row at "f:2" is rejected)
BAD_EVENTS = {
    "unknown_service": [("u", "a", "i1", "f:1", 1), ("u", "zzz", "i1", "f:2", 2), ("u", "a", "i2", "f:3", 3)],
    "item_not_in_catalogue": [
        ("u", "a", "i1", "f:1", 1),
        ("u", "a", "j1", "f:2", 2),
        ("u", "a", "i2", "f:3", 3),
    ],
    "duplicate_event": [("u", "a", "i1", "f:1", 1), ("u", "a", "i1", "f:2", 1), ("u", "a", "i2", "f:3", 3)],
    "missing_timestamp": [
        ("u", "a", "i1", "f:1", 1),
        ("u", "a", "i2", "f:2", None),
        ("u", "a", "i3", "f:3", 3),
    ],
    "empty_user": [("u", "a", "i1", "f:1", 1), ("", "a", "i2", "f:2", 2), ("u", "a", "i3", "f:3", 3)],
    "empty_item_id": [("u", "a", "i1", "f:1", 1), ("u", "a", "", "f:2", 2), ("u", "a", "i3", "f:3", 3)],
}


@pytest.mark.parametrize("reason", sorted(BAD_EVENTS))
def test_bad_event_is_counted_and_nothing_else_is_lost(reason: str, assert_balanced) -> None:
    builder = _builder()
    for user, service, item, where, ts in BAD_EVENTS[reason]:
        builder.add(user, service, item, where, timestamp=ts)
    rows = builder.finish().to_pylist()
    assert dict(builder.report.rejected) == {reason: 1}
    assert [r["item_id"] for r in rows] == [e[2] for e in BAD_EVENTS[reason] if e[3] != "f:2"]
    assert builder.report.examples[0].startswith(f"f:2: {reason}")
    assert_balanced(builder.report)


@pytest.mark.parametrize("reason", sorted(BAD_EVENTS))
def test_bad_event_in_strict_mode_names_where(reason: str) -> None:
    builder = _builder(strict=True)
    with pytest.raises(DataError, match=reason) as error:
        for user, service, item, where, ts in BAD_EVENTS[reason]:
            builder.add(user, service, item, where, timestamp=ts)
        builder.finish()
    assert error.value.where == "f:2"


def _catalogue(strict: bool = False) -> CatalogueBuilder:
    return CatalogueBuilder(SERVICES, ReadReport(source="test", strict=strict))


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        ({"text": "red shoe"}, "duplicate_item"),
        ({"text": "blue shoe"}, "conflicting_item_text"),
    ],
)
def test_repeated_item_keeps_the_first(second: dict, reason: str, assert_balanced) -> None:
    catalogue = _catalogue()
    catalogue.add("a", "i1", "c:1", text="red shoe")
    catalogue.add("a", "i1", "c:2", **second)
    catalogue.add("b", "j1", "c:3", title="pan", categories=["kitchen"], brand="X", price=2.5)
    table = catalogue.finish()
    assert table.schema == ITEM_SCHEMA
    assert table.to_pylist() == [
        {
            "service": "a",
            "item_id": "i1",
            "title": None,
            "categories": [],
            "brand": None,
            "price": None,
            "text": "red shoe",
            "item_text": None,
        },
        {
            "service": "b",
            "item_id": "j1",
            "title": "pan",
            "categories": ["kitchen"],
            "brand": "X",
            "price": 2.5,
            "text": None,
            "item_text": None,
        },
    ]
    assert dict(catalogue.report.rejected) == {reason: 1}
    assert_balanced(catalogue.report)


@pytest.mark.parametrize(
    ("service", "item", "text", "reason"),
    [
        ("a", "i1", "blue shoe", "conflicting_item_text"),
        ("zzz", "i2", None, "unknown_service"),
        ("a", "", None, "empty_item_id"),
    ],
)
def test_bad_item_in_strict_mode_names_where(service: str, item: str, text: str | None, reason: str) -> None:
    catalogue = _catalogue(strict=True)
    catalogue.add("a", "i1", "c:1", text="red shoe")
    with pytest.raises(DataError, match=reason) as error:
        catalogue.add(service, item, "c:2", text=text)
    assert error.value.where == "c:2"


def test_conflicting_item_text_names_the_first_row_and_keeps_it_only_when_lenient() -> None:
    lenient, strict = _catalogue(), _catalogue(strict=True)
    for catalogue in (lenient, strict):
        catalogue.add("a", "i1", "c:1", text="red shoe")
    lenient.add("a", "i1", "c:2", text="blue shoe")
    assert lenient.report.examples == [
        "c:2: conflicting_item_text: a/i1 has a different text than c:1; kept that one"
    ]
    with pytest.raises(DataError) as error:
        strict.add("a", "i1", "c:2", text="blue shoe")
    assert str(error.value) == "c:2: conflicting_item_text: a/i1 has a different text than c:1"
