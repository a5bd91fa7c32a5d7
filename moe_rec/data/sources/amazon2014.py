"""Reader for the Amazon 2014 5-core benchmark (beauty, sports, toys) as one multi-service data set.

The folder holds one subfolder per domain; each domain is a service::

    <path>/<domain>/sequential.txt     user_index item_index ...   (one user a line, chronological)
    <path>/<domain>/datamaps.json      {"id2user": {index: reviewerID}, "id2item": {index: ASIN}}
    <path>/<domain>/item_keywords.txt  ASIN keyword keyword ...
    <path>/beauty/items.tsv            item_id title sales_type sales_rank categories price brand

Users are keyed by reviewerID, which joins the same reviewer across domains. The source has no
timestamps, only order, so events keep the order of ``sequential.txt`` and the leave-one-out split of
:class:`~moe_rec.data.histories.EventBuilder` is exactly the published one (last item test, second to
last valid).

The catalogue holds every ASIN of ``id2item`` with its keywords as ``text``; beauty adds title,
categories, price and brand from ``items.tsv``. That file is quoted TSV: a few titles hold a tab or a
line break inside quotes, and categories are a Python-list-like string whose quotes are doubled in
CSV style. Keywords and ``items.tsv`` only enrich items that ``id2item`` defines, so a side-file row
that cannot be used is counted in the items report's notes (strict mode: an error) and the item stays
in the catalogue without it; rows repaired on the way (whitespace inside a field, a list string that
needed a fallback parse, an unparsable price) are counted in notes too.
"""

from __future__ import annotations

import ast
import csv
import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from moe_rec.console import track
from moe_rec.data.config import DataConfig
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.schema import DataError, ReadReport
from moe_rec.data.sources import reject_rows, select_services

SEQUENCES = "sequential.txt"
DATAMAPS = "datamaps.json"
KEYWORDS = "item_keywords.txt"
ITEMS_TSV = "items.tsv"
EVENT_TYPE = "review"
TSV_COLUMNS = ("item_id", "title", "categories", "price", "brand")  # the items.tsv columns we use
MAX_RECORD_LINES = 3  # a quoted items.tsv field may span lines; an unclosed quote costs one line
_LIST_COMMA = re.compile(r"""(?<=['"])\s*,\s*|\s*,\s*(?=['"])""")  # a comma beside a quote ends a list item


def read(cfg: DataConfig) -> tuple[pa.Table, pa.Table, ReadReport, ReadReport]:
    """Read the selected domains of ``cfg.path``.

    Returns:
        ``(events, items, events_report, items_report)``: events with ``EVENT_SCHEMA`` sorted by user,
        items with ``ITEM_SCHEMA``.
    """
    root = Path(cfg.path)
    services = _select_services(root, cfg.services)
    events_report = ReadReport(source="amazon2014 events", strict=cfg.strict)
    items_report = ReadReport(source="amazon2014 items", strict=cfg.strict)
    maps = {service: _datamaps(root / service / DATAMAPS) for service in services}
    catalogue = CatalogueBuilder(services, items_report)
    for service in services:
        _add_items(root / service, service, maps[service]["id2item"], catalogue, items_report)
    builder = EventBuilder(services, catalogue.keys(), events_report)
    for service in services:
        builder.expect_users(maps[service]["id2user"].values())
        _add_events(root / service / SEQUENCES, service, maps[service], builder, events_report)
    return builder.finish(), catalogue.finish(), events_report, items_report


def _select_services(root: Path, requested: list[str] | None) -> list[str]:
    """Domains present under ``root`` (subfolders with a ``sequential.txt``), or the requested subset."""
    if not root.is_dir():
        raise DataError(f"amazon2014 folder not found: {root} (expected beauty/ sports/ toys/ subfolders)")
    available = sorted(p.name for p in root.iterdir() if (p / SEQUENCES).is_file())
    if not available:
        raise DataError(
            f"no domain subfolders with a {SEQUENCES} in {root} (expected e.g. beauty/ sports/ toys/)"
        )
    return select_services(f"amazon2014 (domain folders in {root})", available, requested)


def _datamaps(path: Path) -> dict[str, dict[str, str]]:
    """``id2user`` and ``id2item`` of one domain (indices kept as the strings the files use)."""
    if not path.is_file():
        raise DataError(f"missing {DATAMAPS} (expected {{'id2user': ..., 'id2item': ...}})", str(path))
    try:
        maps = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", str(path)) from None
    for key in ("id2user", "id2item"):
        if not isinstance(maps, dict) or not isinstance(maps.get(key), dict):
            raise DataError(f"expected a JSON object with an {key!r} mapping", str(path))
    return {key: {str(k): str(v) for k, v in maps[key].items()} for key in ("id2user", "id2item")}


def _add_events(
    path: Path, service: str, maps: dict[str, dict[str, str]], builder: EventBuilder, report: ReadReport
) -> None:
    """Feed ``sequential.txt`` (one user a line, items in order) to the event builder."""
    id2user, id2item = maps["id2user"], maps["id2item"]
    seen_users: set[str] = set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(track(lines, f"amazon2014 {service}"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{lineno}"
        user_index, item_indices = tokens[0], tokens[1:]
        user = id2user.get(user_index)
        if user is None or user_index in seen_users:
            reason = "unknown_user_index" if user is None else "duplicate_user_line"
            reject_rows(report, len(item_indices), reason, where, f"user index {user_index}")
            continue
        seen_users.add(user_index)
        for index in item_indices:
            asin = id2item.get(index)
            if asin is None:
                report.rows_read += 1
                report.reject("unknown_item_index", where, f"item index {index} is not in {DATAMAPS}")
                continue
            builder.add(user, service, asin, where, event_type=EVENT_TYPE)


def _add_items(
    folder: Path, service: str, id2item: dict[str, str], catalogue: CatalogueBuilder, report: ReadReport
) -> None:
    """One catalogue row per ASIN of ``id2item``, with keywords and (beauty) ``items.tsv`` details."""
    known = set(id2item.values())
    keywords = _keywords(folder / KEYWORDS, known, report)
    _note_count(report, "items_without_keywords", len(known - keywords.keys()))
    details: dict[str, dict[str, Any]] = {}
    if (folder / ITEMS_TSV).exists():
        details = _items_tsv(folder / ITEMS_TSV, known, report)
        _note_count(report, "items_without_items_tsv_row", len(known - details.keys()))
    datamaps = folder / DATAMAPS
    for index, asin in id2item.items():
        catalogue.add(
            service, asin, f"{datamaps}:id2item[{index}]", text=keywords.get(asin), **details.get(asin, {})
        )


def _note_count(report: ReadReport, what: str, count: int) -> None:
    if count:
        report.note(what, count)


def _side_problem(report: ReadReport, reason: str, where: str, detail: str) -> None:
    """A side-file row that cannot be used: noted (the item keeps its catalogue row); strict raises."""
    if report.strict:
        raise DataError(f"{reason}: {detail}", where)
    report.note(reason)
    if len(report.examples) < report.max_examples:
        report.examples.append(f"{where}: {reason}: {detail}")


def _keywords(path: Path, known: set[str], report: ReadReport) -> dict[str, str | None]:
    """``ASIN -> "keyword keyword ..."`` from ``item_keywords.txt`` (first line of an ASIN wins)."""
    if not path.is_file():
        raise DataError(f"missing {KEYWORDS} (expected lines 'ASIN keyword keyword ...')", str(path))
    out: dict[str, str | None] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        asin, words = tokens[0], tokens[1:]
        where = f"{path}:{lineno}"
        if asin not in known:
            _side_problem(report, "keywords_for_unknown_item", where, f"{asin} is not in {DATAMAPS}")
        elif asin in out:
            _side_problem(report, "duplicate_keywords_line", where, f"{asin} already has keywords")
        else:
            out[asin] = " ".join(words) or None
    return out


def _items_tsv(path: Path, known: set[str], report: ReadReport) -> dict[str, dict[str, Any]]:
    """``ASIN -> {title, categories, price, brand}`` from the quoted TSV ``items.tsv``."""
    lines = path.read_text(encoding="utf-8").split("\n")
    header = [name.split(":")[0] for name in next(csv.reader([lines[0]], delimiter="\t"), [])]
    missing = [name for name in TSV_COLUMNS if name not in header]
    if missing:
        raise DataError(f"header lacks column(s) {missing} (expected {list(TSV_COLUMNS)})", f"{path}:1")
    col = {name: header.index(name) for name in TSV_COLUMNS}
    out: dict[str, dict[str, Any]] = {}
    for lineno, fields in _tsv_records(lines, len(header)):
        where = f"{path}:{lineno}"
        if fields is None:
            _side_problem(
                report, "items_tsv_unparsable_row", where, f"not {len(header)} tab-separated fields"
            )
            continue
        asin = fields[col["item_id"]].strip()
        if asin not in known:
            _side_problem(report, "items_tsv_unknown_item", where, f"{asin!r} is not in {DATAMAPS}")
        elif asin in out:
            _side_problem(report, "items_tsv_duplicate_item", where, f"{asin} already has a row")
        else:
            out[asin] = _item_details(fields, col, where, report)
    return out


def _tsv_records(lines: list[str], width: int) -> Iterator[tuple[int, list[str] | None]]:
    """``(first line number, fields)`` per record after the header; ``None`` for an unparsable line.

    A record is the fewest lines (up to ``MAX_RECORD_LINES``) that parse as exactly one row of
    ``width`` fields, so a quoted field may hold tabs or line breaks while a stray unclosed quote
    loses only its own line.
    """
    i = 1
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        for span in range(1, MAX_RECORD_LINES + 1):
            rows = list(csv.reader(io.StringIO("\n".join(lines[i : i + span])), delimiter="\t"))
            if len(rows) == 1 and len(rows[0]) == width:
                yield i + 1, rows[0]
                i += span
                break
        else:
            yield i + 1, None
            i += 1


def _item_details(fields: list[str], col: dict[str, int], where: str, report: ReadReport) -> dict[str, Any]:
    """Title, categories, price and brand of one ``items.tsv`` row, noting what had to be repaired."""
    if any("\n" in f for f in fields):
        report.note("items_tsv_line_break_in_field")
    if any("\t" in f for f in fields):
        report.note("items_tsv_tab_in_field")
    categories, clean = _categories(fields[col["categories"]])
    if not clean:
        report.note("items_tsv_categories_repaired")
    price_text = fields[col["price"]].strip()
    try:
        price = float(price_text) if price_text else None
    except ValueError:
        report.note("items_tsv_unparsable_price")
        price = None
    return {
        "title": _clean(fields[col["title"]]),
        "categories": categories,
        "brand": _clean(fields[col["brand"]]),
        "price": price,
    }


def _clean(text: str) -> str | None:
    """Decode HTML entities (``&amp;``) and collapse whitespace (tabs, line breaks); empty -> None."""
    return " ".join(html.unescape(text).split()) or None


def _categories(raw: str) -> tuple[list[str], bool]:
    """Parse ``'Beauty', 'Makeup', "Women's"`` into a list; the flag is False when the fallback was needed.

    The string is read as a Python list literal; failing that (``'Men's'``, CSV-doubled quotes, bare
    words) it is split on the commas beside a quote (on every comma when there is no quote) and the
    quotes are stripped.
    """
    raw = raw.strip()
    if not raw:
        return [], True
    try:
        value = ast.literal_eval(f"[{raw}]")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [c for c in map(_clean, value) if c], True
    parts = _LIST_COMMA.split(raw) if ("'" in raw or '"' in raw) else raw.split(",")
    return [c for c in (_clean(p.strip().strip("'\"")) for p in parts) if c], False
