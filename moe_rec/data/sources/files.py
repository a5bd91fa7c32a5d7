"""Reader for the user's own data: event files and catalogue files in Parquet, CSV or JSONL.

``data.files`` (:class:`~moe_rec.data.config.FilesConfig`) lists paths or globs of both. Our columns:

* events: ``user``, ``service``, ``item_id``, ``timestamp`` (required); ``event_type`` (default
  ``"interaction"``), ``quantity``, ``price`` (optional);
* catalogue: ``service``, ``item_id`` (required); ``title``, ``categories`` (a list, or one string
  split on ``category_separator``), ``brand``, ``price``, ``text``, ``item_text`` (optional; a
  pre-composed text that the semantic-ID encoder takes as is instead of composing the fields).

Two columns may be left out: ``timestamp`` with ``timestamp_unit: none`` (order-only data: a user's
events in one service keep the order in which the files list them, files in the order configured,
a glob's matches sorted by name), and ``service`` with ``default_service: NAME`` (every row of a
file without a service column is of that service).

``event_columns`` / ``item_columns`` map our name to the column name in the files where they differ.
The catalogue is required: semantic IDs are built from item text, and the catalogue defines the
services (``data.services`` picks a subset of them).

A file that lacks a required column is an error naming the file, the column and the mapping key to
set. A malformed row (a missing required value, an unparsable timestamp / price / quantity, a JSON
line that does not parse, a CSV row with the wrong number of fields) is rejected with its reason and
``file:line`` (for Parquet the line is the 1-based row number); every other rule (unknown service,
item not in the catalogue, duplicates, ordering, splits) is applied by
:mod:`moe_rec.data.histories`.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from collections.abc import Callable, Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moe_rec.console import track
from moe_rec.data.config import DataConfig, FilesConfig
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.schema import DataError, ReadReport
from moe_rec.data.sources import select_services

EVENT_FIELDS = ("user", "service", "item_id", "timestamp", "event_type", "quantity", "price")
EVENT_REQUIRED = ("user", "service", "item_id", "timestamp")
ITEM_FIELDS = ("service", "item_id", "title", "categories", "brand", "price", "text", "item_text")
ITEM_REQUIRED = ("service", "item_id")
DEFAULT_EVENT_TYPE = "interaction"
SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}

Row = tuple[str, dict[str, Any]]  # (file:line, values by column)


class _BadRow(Exception):
    """A row that cannot be used: the reason it is counted under and a detail for the user."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read(cfg: DataConfig) -> tuple[pa.Table, pa.Table, ReadReport, ReadReport]:
    """Read ``cfg.files``: the catalogue first (it defines the services), then the events.

    Returns:
        ``(events, items, events_report, items_report)``: events with ``EVENT_SCHEMA`` sorted by user,
        items with ``ITEM_SCHEMA``.
    """
    files = cfg.files
    _check_mapping(files.event_columns, EVENT_FIELDS, "event_columns")
    _check_mapping(files.item_columns, ITEM_FIELDS, "item_columns")
    if not files.catalogue:
        raise DataError(
            "data.files.catalogue is empty: a catalogue is required (service, item_id and the item's "
            "title / categories / text, from which semantic IDs are built)"
        )
    events_report = ReadReport(source="files events", strict=cfg.strict)
    items_report = ReadReport(source="files items", strict=cfg.strict)
    events_required = tuple(
        c for c in EVENT_REQUIRED if not (c == "timestamp" and files.timestamp_unit == "none")
    )
    items = list(_rows(files, "catalogue", ITEM_REQUIRED, _item, items_report))
    available = sorted({item["service"] for _, item in items})
    services = _select_services(available, cfg.services)
    catalogue = CatalogueBuilder(services, items_report)
    for where, item in items:
        if item["service"] in services:
            catalogue.add(where=where, **item)
        else:
            items_report.note("items_in_unselected_services")
    builder = EventBuilder(services, catalogue.keys(), events_report)
    for where, event in _rows(files, "events", events_required, _event, events_report):
        if event["service"] in available and event["service"] not in services:
            events_report.note("events_in_unselected_services")
        else:
            builder.add(where=where, **event)
    return builder.finish(), catalogue.finish(), events_report, items_report


def _check_mapping(mapping: dict[str, str], fields: tuple[str, ...], key: str) -> None:
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise DataError(f"data.files.{key} has unknown key(s) {unknown}; our columns are {list(fields)}")


def _select_services(available: list[str], requested: list[str] | None) -> list[str]:
    if not available:
        raise DataError("the catalogue files hold no usable item rows, so there are no services")
    return select_services("the catalogue files", available, requested)


def _rows(
    files: FilesConfig,
    what: str,
    required: tuple[str, ...],
    convert: Callable[[dict[str, Any], FilesConfig], dict[str, Any]],
    report: ReadReport,
) -> Iterator[Row]:
    """Rows of every ``what`` file (``events`` / ``catalogue``) renamed to our columns and converted.

    A file without a service column takes ``files.default_service`` when it is set. Rows that
    cannot be used are counted as read and rejected in ``report``.
    """
    key = "event_columns" if what == "events" else "item_columns"
    mapping = getattr(files, key)
    fields = EVENT_FIELDS if what == "events" else ITEM_FIELDS
    for path in _expand(getattr(files, what), what):
        try:
            columns, records = _open(path, _format(path, files.format))
            fill = {}
            if files.default_service is not None and mapping.get("service", "service") not in (columns or ()):
                fill = {"service": files.default_service}
            _check_columns(path, columns, tuple(c for c in required if c not in fill), mapping, key)
            for where, record in track(records, f"reading {path.name}"):
                try:
                    if isinstance(record, _BadRow):
                        raise record
                    values = {ours: record.get(mapping.get(ours, ours)) for ours in fields}
                    yield where, convert({**values, **fill}, files)
                except _BadRow as bad:
                    report.rows_read += 1
                    report.reject(bad.reason, where, bad.detail)
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text: {e}", str(path)) from None


def _check_columns(
    path: Path, columns: list[str] | None, required: tuple[str, ...], mapping: dict[str, str], key: str
) -> None:
    """A required column missing from the file's header is an error naming the mapping key to set."""
    for ours in required:
        theirs = mapping.get(ours, ours)
        if columns is not None and theirs not in columns:
            raise DataError(
                f"no column {theirs!r} for {ours!r} (the file has {sorted(columns)}); "
                f"set data.files.{key}.{ours} to the column that holds it",
                str(path),
            )


def _expand(patterns: list[str], what: str) -> list[Path]:
    """Paths of every pattern (globs allowed); a pattern that matches nothing is an error."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise DataError(f"no file matches {pattern!r} (data.files.{what}: {what} files, paths or globs)")
        paths.extend(Path(m) for m in matches)
    return paths


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"cannot tell the format from the suffix {path.suffix!r}; name files *.parquet, *.csv or "
            "*.jsonl, or set data.files.format",
            str(path),
        )
    return found


def _open(path: Path, fmt: str) -> tuple[list[str] | None, Iterator[tuple[str, dict[str, Any] | _BadRow]]]:
    """The file's column names (None when unknown) and its records as ``(file:line, dict | _BadRow)``."""
    if fmt == "parquet":
        return _parquet(path)
    if fmt == "csv":
        return _csv(path)
    return _jsonl(path)


def _parquet(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", str(path)) from None

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        row = 0
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record

    return parquet.schema_arrow.names, records()


def _csv(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any] | _BadRow]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = [name.strip() for name in next(csv.reader(f), [])]

    def records() -> Iterator[tuple[str, dict[str, Any] | _BadRow]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader, None)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield f"{path}:{reader.line_num}", _BadRow("malformed_csv", str(e))
                    continue
                where = f"{path}:{reader.line_num}"
                if not row:
                    continue
                if len(row) != len(header):
                    yield (
                        where,
                        _BadRow("wrong_field_count", f"{len(row)} fields, the header has {len(header)}"),
                    )
                else:
                    yield where, dict(zip(header, row, strict=True))

    return header, records()


def _jsonl(path: Path) -> tuple[list[str] | None, Iterator[tuple[str, dict[str, Any] | _BadRow]]]:
    """JSON lines; the columns are the keys seen in any line (None when no line holds an object)."""
    records: list[tuple[str, dict[str, Any] | _BadRow]] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                records.append((f"{path}:{lineno}", _json_object(line)))
    keys = {key for _, record in records if isinstance(record, dict) for key in record}
    return (sorted(keys) if keys else None), iter(records)


def _json_object(line: str) -> dict[str, Any] | _BadRow:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return _BadRow("bad_json", str(e))
    return (
        value if isinstance(value, dict) else _BadRow("bad_json", f"not a JSON object: {line.strip()[:80]}")
    )


def _event(values: dict[str, Any], files: FilesConfig) -> dict[str, Any]:
    return {
        "user": _required(values, "user"),
        "service": _required(values, "service"),
        "item_id": _required(values, "item_id"),
        "timestamp": _timestamp(values["timestamp"], files.timestamp_unit),
        "event_type": _text(values["event_type"]) or DEFAULT_EVENT_TYPE,
        "quantity": _number(values["quantity"], "bad_quantity"),
        "price": _number(values["price"], "bad_price"),
    }


def _item(values: dict[str, Any], files: FilesConfig) -> dict[str, Any]:
    return {
        "service": _required(values, "service"),
        "item_id": _required(values, "item_id"),
        "title": _text(values["title"]),
        "categories": _categories(values["categories"], files.category_separator),
        "brand": _text(values["brand"]),
        "price": _number(values["price"], "bad_price"),
        "text": _text(values["text"]),
        "item_text": _text(values["item_text"]),
    }


def _text(value: Any) -> str | None:
    """A stripped string; None for a missing, empty or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value).strip() or None


def _required(values: dict[str, Any], name: str) -> str:
    text = _text(values[name])
    if text is None:
        raise _BadRow("missing_field", f"no value for {name!r}")
    return text


def _number(value: Any, reason: str) -> float | None:
    """A finite float, None when missing; anything else is a bad row counted under ``reason``."""
    if _text(value) is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadRow(reason, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise _BadRow(reason, f"{value!r} is not a number")
    return number


def _timestamp(value: Any, unit: str) -> int | None:
    """Unix seconds from seconds, milliseconds, an ISO string or a date/datetime (naive means UTC);
    None for order-only data (``unit == "none"``), whatever the file holds."""
    if unit == "none":
        return None
    if _text(value) is None:
        raise _BadRow("missing_field", "no value for 'timestamp'")
    try:
        if isinstance(value, date):
            return _unix(value)
        if unit == "iso":
            return _unix(datetime.fromisoformat(str(value).strip().replace("Z", "+00:00")))
        if isinstance(value, bool):
            raise TypeError("a boolean")
        number = value if isinstance(value, int) else float(value)
        return int(number // 1000 if unit == "ms" else number)
    except (TypeError, ValueError, OverflowError) as e:
        raise _BadRow("bad_timestamp", f"{value!r} is not a timestamp in unit {unit!r} ({e})") from None


def _unix(value: date) -> int:
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return int((value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp())


def _categories(value: Any, separator: str) -> list[str]:
    """A list of category names from a list or a ``separator``-joined string."""
    if isinstance(value, (list, tuple)):
        parts = [_text(v) for v in value]
    else:
        text = _text(value)
        parts = [p.strip() for p in text.split(separator)] if text else []
    return [p for p in parts if p]
