"""Validate raw rows and turn them into the event and catalogue tables.

Every reader feeds its rows through the same two builders, so the rules below hold for every
source and are tested once:

* an event's service must be one of the configured services (``unknown_service``);
* an event's item must be in that service's catalogue (``item_not_in_catalogue``);
* within one user's history in one service, events are ordered by timestamp (stable, so the
  source's order breaks ties; a history whose source order disagreed is counted in notes as
  ``histories_reordered_by_timestamp``); where a history has timestamps, a row without one is
  rejected (``missing_timestamp``);
* an exact repeat of an event (same service, item, timestamp and type) is dropped
  (``duplicate_event``); without timestamps repeats are distinct events and kept;
* leave-one-out per service: the last event is ``test``, the second to last ``valid``, the
  rest ``train`` (a two-event history has no ``valid``; a one-event history is ``train`` only
  and counted as ``one_event_histories``);
* a user who was expected (e.g. listed in a user file) but has no event left is counted as
  ``empty_histories``;
* one item id with two different texts keeps the first and rejects the second
  (``conflicting_item_text``); an identical repeat is ``duplicate_item``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, ReadReport

# One raw event: (service, item_id, timestamp | None, event_type, quantity | None, price | None, where)
RawEvent = tuple


def order_and_split(rows: list[RawEvent], report: ReadReport) -> list[tuple[RawEvent, int, str]]:
    """Order one user's history in one service, drop exact repeats and assign leave-one-out splits.

    Args:
        rows: the user's raw events in one service, in source order.
        report: where rejected rows and notes are counted.

    Returns:
        ``(row, position, split)`` for every kept row, in chronological order.
    """
    timed = [r for r in rows if r[2] is not None]
    if timed and len(timed) != len(rows):
        for r in rows:
            if r[2] is None:
                report.reject("missing_timestamp", r[6], "the rest of this history has timestamps")
        rows = timed
    if timed:
        ordered = sorted(rows, key=lambda r: r[2])  # stable: source order breaks ties
        if any(a is not b for a, b in zip(ordered, rows, strict=True)):
            report.note("histories_reordered_by_timestamp")
        seen: set[tuple] = set()
        kept = []
        for r in ordered:
            key = (r[1], r[2], r[3])
            if key in seen:
                report.reject("duplicate_event", r[6], f"item {r[1]!r} at {r[2]} repeated")
                continue
            seen.add(key)
            kept.append(r)
        rows = kept
    n = len(rows)
    if n == 1:
        report.note("one_event_histories")
    out = []
    for i, r in enumerate(rows):
        split = "test" if (i == n - 1 and n >= 2) else "valid" if (i == n - 2 and n >= 3) else "train"
        out.append((r, i, split))
    return out


class EventBuilder:
    """Collects raw events, validates them and returns the events table grouped per user.

    Args:
        services: the configured service names; events of any other service are rejected.
        catalogue: ``(service, item_id)`` pairs that exist; ``None`` skips the catalogue check.
        report: counts rows read, kept and rejected (strict mode raises on the first rejection).
    """

    def __init__(
        self, services: Sequence[str], catalogue: set[tuple[str, str]] | None, report: ReadReport
    ) -> None:
        self.services = set(services)
        self.catalogue = catalogue
        self.report = report
        self._users: dict[str, dict[str, list[RawEvent]]] = {}
        self._expected: set[str] = set()

    def expect_users(self, users: Iterable[str]) -> None:
        """Users known to exist (from a user list); those left without events count as empty."""
        self._expected.update(users)

    def add(
        self,
        user: str,
        service: str,
        item_id: str,
        where: str,
        timestamp: int | None = None,
        event_type: str = "interaction",
        quantity: float | None = None,
        price: float | None = None,
    ) -> None:
        """Validate and keep one event (or count it as rejected)."""
        self.report.rows_read += 1
        if not user:
            self.report.reject("empty_user", where)
            return
        if service not in self.services:
            self.report.reject("unknown_service", where, f"{service!r} is not one of {sorted(self.services)}")
            return
        if not item_id:
            self.report.reject("empty_item_id", where)
            return
        if self.catalogue is not None and (service, item_id) not in self.catalogue:
            self.report.reject("item_not_in_catalogue", where, f"{service}/{item_id}")
            return
        row = (service, item_id, timestamp, event_type, quantity, price, where)
        self._users.setdefault(user, {}).setdefault(service, []).append(row)

    def finish(self) -> pa.Table:
        """Order, de-duplicate and split every history; returns a table with :data:`EVENT_SCHEMA`."""
        cols: dict[str, list[Any]] = {name: [] for name in EVENT_SCHEMA.names}
        for user in sorted(self._users):
            for service in sorted(self._users[user]):
                for (svc, item, ts, etype, qty, price, _), pos, split in order_and_split(
                    self._users[user][service], self.report
                ):
                    cols["user"].append(user)
                    cols["service"].append(svc)
                    cols["item_id"].append(item)
                    cols["timestamp"].append(ts)
                    cols["position"].append(pos)
                    cols["split"].append(split)
                    cols["event_type"].append(etype)
                    cols["quantity"].append(qty)
                    cols["price"].append(price)
        empty = len(self._expected - self._users.keys())
        if empty:
            self.report.note("empty_histories", empty)
        self.report.rows_kept += len(cols["user"])
        self._users.clear()
        return pa.Table.from_pydict(cols, schema=EVENT_SCHEMA)


class CatalogueBuilder:
    """Collects catalogue rows, keeping the first text of each ``(service, item_id)``."""

    def __init__(self, services: Sequence[str], report: ReadReport) -> None:
        self.services = set(services)
        self.report = report
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        self._where: dict[tuple[str, str], str] = {}  # where each kept row was read

    def add(
        self,
        service: str,
        item_id: str,
        where: str,
        title: str | None = None,
        categories: Sequence[str] | None = None,
        brand: str | None = None,
        price: float | None = None,
        text: str | None = None,
        item_text: str | None = None,
    ) -> None:
        self.report.rows_read += 1
        if service not in self.services:
            self.report.reject("unknown_service", where, f"{service!r} is not one of {sorted(self.services)}")
            return
        if not item_id:
            self.report.reject("empty_item_id", where)
            return
        row = {
            "service": service,
            "item_id": item_id,
            "title": title,
            "categories": list(categories) if categories else [],
            "brand": brand,
            "price": price,
            "text": text,
            "item_text": item_text,
        }
        key = (service, item_id)
        first = self._items.get(key)
        if first is not None:
            if first == row:
                self.report.reject("duplicate_item", where, f"{service}/{item_id} repeated")
            else:  # strict mode stops here, so only a lenient run keeps the first row
                kept = "" if self.report.strict else "; kept that one"
                self.report.reject(
                    "conflicting_item_text",
                    where,
                    f"{service}/{item_id} has a different text than {self._where[key]}{kept}",
                )
            return
        self._items[key] = row
        self._where[key] = where

    def keys(self) -> set[tuple[str, str]]:
        return set(self._items)

    def finish(self) -> pa.Table:
        """Returns the catalogue sorted by ``(service, item_id)`` with :data:`ITEM_SCHEMA`."""
        rows = [self._items[k] for k in sorted(self._items)]
        self.report.rows_kept += len(rows)
        return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
