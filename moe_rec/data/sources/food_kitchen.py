"""Reader for the food + kitchen cross-domain set (Amazon Grocery and Home & Kitchen, with timestamps).

Files in the folder::

    Alist.txt           index ASIN local_index        food items
    Blist.txt           index ASIN local_index        kitchen items
    userlist.txt        reviewerID user_index
    validdata_new.txt   user_index other_index item|unix_time|date| ...   (tab-separated)
    testdata_new.txt    same layout; the two files hold disjoint users, each line a full history

An event's item number ``n`` is a food local index when ``n < F`` and the kitchen local index
``n - F`` otherwise, where ``F`` is the number of food items (one more than the largest food local
index: 29,207). Events carry unix timestamps, so :class:`~moe_rec.data.histories.EventBuilder` sorts
each user's history per service and the last event of each service is the test target. A line's
events are not always in time order across the two services; such lines are counted in the events
report's notes (``lines_out_of_time_order``). Every user of ``userlist.txt`` is expected, so one
without events counts as an empty history. The catalogue has ASINs only (no text).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from moe_rec.console import track
from moe_rec.data.config import DataConfig
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.schema import DataError, ReadReport
from moe_rec.data.sources import reject_rows, select_services

SERVICES = ("food", "kitchen")
ITEM_LISTS = {"food": "Alist.txt", "kitchen": "Blist.txt"}
USERS = "userlist.txt"
HISTORIES = ("validdata_new.txt", "testdata_new.txt")
EVENT_TYPE = "review"


def read(cfg: DataConfig) -> tuple[pa.Table, pa.Table, ReadReport, ReadReport]:
    """Read the selected services of ``cfg.path``.

    Returns:
        ``(events, items, events_report, items_report)``: events with ``EVENT_SCHEMA`` sorted by user,
        items with ``ITEM_SCHEMA``.
    """
    root = Path(cfg.path)
    services = select_services("food_kitchen", SERVICES, cfg.services)
    _check_files(root)
    events_report = ReadReport(source="food_kitchen events", strict=cfg.strict)
    items_report = ReadReport(source="food_kitchen items", strict=cfg.strict)
    # both lists are read whatever the selection: kitchen item numbers start after the food ones
    lists = {service: _item_list(root / name, items_report) for service, name in ITEM_LISTS.items()}
    catalogue = CatalogueBuilder(services, items_report)
    for service in services:
        for asin, where in lists[service].values():
            catalogue.add(service, asin, where)
    users = _users(root / USERS)
    builder = EventBuilder(services, catalogue.keys(), events_report)
    builder.expect_users(users.values())
    numbers = _item_numbers(lists["food"], lists["kitchen"])
    seen: set[str] = set()
    for name in HISTORIES:
        _add_histories(root / name, users, numbers, seen, builder, events_report)
    return builder.finish(), catalogue.finish(), events_report, items_report


def _check_files(root: Path) -> None:
    if not root.is_dir():
        raise DataError(
            f"food_kitchen folder not found: {root} (expected Alist.txt, Blist.txt, {USERS}, ...)"
        )
    for name in (*ITEM_LISTS.values(), USERS, *HISTORIES):
        if not (root / name).is_file():
            raise DataError(f"missing {name} in the food_kitchen folder {root}", str(root / name))


def _item_list(path: Path, report: ReadReport) -> dict[int, tuple[str, str]]:
    """``local_index -> (ASIN, file:line)`` of ``Alist.txt`` / ``Blist.txt``."""
    out: dict[int, tuple[str, str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) != 3 or not fields[2].isdigit():
            report.rows_read += 1
            report.reject("malformed_item_line", where, "expected 'index ASIN local_index'")
        elif int(fields[2]) in out:
            report.rows_read += 1
            report.reject(
                "duplicate_local_index", where, f"local index {fields[2]} is already {out[int(fields[2])][0]}"
            )
        else:
            out[int(fields[2])] = (fields[1], where)
    return out


def _item_numbers(
    food: dict[int, tuple[str, str]], kitchen: dict[int, tuple[str, str]]
) -> dict[int, tuple[str, str]]:
    """``item number -> (service, ASIN)``: food keeps its local index, kitchen is shifted past food."""
    offset = max(food, default=-1) + 1
    numbers = {local: ("food", asin) for local, (asin, _) in food.items()}
    numbers.update({offset + local: ("kitchen", asin) for local, (asin, _) in kitchen.items()})
    return numbers


def _users(path: Path) -> dict[int, str]:
    """``user_index -> reviewerID`` from ``userlist.txt``."""
    out: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError("expected 'reviewerID user_index'", f"{path}:{lineno}")
        out[int(fields[1])] = fields[0]
    return out


def _add_histories(
    path: Path,
    users: dict[int, str],
    numbers: dict[int, tuple[str, str]],
    seen: set[str],
    builder: EventBuilder,
    report: ReadReport,
) -> None:
    """Feed one history file (one user a line) to the event builder; ``seen`` collects its users."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(track(lines, f"food_kitchen {path.name}"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        events = [f for f in fields[2:] if f.strip()]
        where = f"{path}:{lineno}"
        user = users.get(int(fields[0])) if fields[0].strip().isdigit() else None
        if user is None or user in seen:
            reason = "unknown_user_index" if user is None else "duplicate_user_line"
            reject_rows(report, max(len(events), 1), reason, where, f"user index {fields[0]!r}")
            continue
        seen.add(user)
        times = [_add_event(event, user, numbers, where, builder, report) for event in events]
        times = [t for t in times if t is not None]
        if times != sorted(times):
            report.note("lines_out_of_time_order")


def _add_event(
    token: str,
    user: str,
    numbers: dict[int, tuple[str, str]],
    where: str,
    builder: EventBuilder,
    report: ReadReport,
) -> int | None:
    """Feed one ``item|unix_time|date|`` event; returns its time, or None when it was rejected."""
    parts = token.strip().split("|")
    try:
        number, timestamp = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        report.rows_read += 1
        report.reject("malformed_event", where, f"{token!r} is not item|unix_time|date")
        return None
    if number not in numbers:
        report.rows_read += 1
        report.reject("unknown_item_index", where, f"item number {number} is in neither item list")
        return None
    service, asin = numbers[number]
    if service in builder.services:
        builder.add(user, service, asin, where, timestamp=timestamp, event_type=EVENT_TYPE)
    else:
        report.note("events_in_unselected_services")
    return timestamp
