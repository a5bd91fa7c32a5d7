"""Tests of the user-files reader (moe_rec.data.sources.files) on tiny CSV / JSONL / Parquet fixtures."""

from __future__ import annotations

import csv
import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_rec.data.config import DataConfig, FilesConfig
from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, DataError
from moe_rec.data.sources import files

EVENT_COLS = ["user", "service", "item_id", "timestamp", "event_type", "quantity", "price"]
ITEM_COLS = ["service", "item_id", "title", "categories", "brand", "price", "text"]


def _item(*values: object) -> dict:
    return dict(zip(ITEM_COLS, values, strict=True))


ITEMS = [
    _item("a", f"i{k}", f"Shoe {k}", "shoes|red", "Acme", 10.5 + k, f"a red shoe number {k}")
    for k in range(5)
]
ITEMS += [_item("b", f"j{k}", f"Pan {k}", "kitchen", None, None, None) for k in range(4)]


def _good_events() -> list[dict]:
    """Shuffled events of 8 users over both services: ties, out-of-order times, 1-event histories."""
    rng = random.Random(1)
    rows, seen = [], set()
    for u in range(8):
        for service, prefix, n_items in (("a", "i", 5), ("b", "j", 4)):
            for _ in range(rng.choice([0, 1, 2, 3, 6])):
                item, ts = f"{prefix}{rng.randrange(n_items)}", rng.randrange(1, 12) * 100
                if (f"u{u}", service, item, ts) in seen:
                    continue
                seen.add((f"u{u}", service, item, ts))
                rows.append(
                    {
                        "user": f"u{u}",
                        "service": service,
                        "item_id": item,
                        "timestamp": ts,
                        "event_type": rng.choice([None, "view", "purchase"]),
                        "quantity": rng.choice([None, 1.0, 2.0]),
                        "price": rng.choice([None, 3.25]),
                    }
                )
    rng.shuffle(rows)
    return rows


GOOD = _good_events()


def _expected(rows: list[dict], expected_splits) -> dict[tuple[str, str], list[tuple]]:
    """Independent reference: per (user, service), stable sort by time, then leave-one-out."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["user"], r["service"]), []).append(r)
    result = {}
    for key, events in out.items():
        events = sorted(events, key=lambda r: r["timestamp"])
        result[key] = [
            (r["item_id"], r["timestamp"], r["event_type"] or "interaction", r["quantity"], r["price"], split)
            for r, split in zip(events, expected_splits(len(events)), strict=True)
        ]
    return result


def _got(events: pa.Table, histories) -> dict[tuple[str, str], list[tuple]]:
    return {
        key: [
            (r["item_id"], r["timestamp"], r["event_type"], r["quantity"], r["price"], r["split"])
            for r in rows
        ]
        for key, rows in histories(events).items()
    }


def _write(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Rows as CSV, JSONL or Parquet, from the suffix (``.parquet`` keeps the Python types)."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows([{c: r.get(c) for c in columns} for r in rows])
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), path)
    else:
        path.write_text("".join(json.dumps({c: r.get(c) for c in columns}) + "\n" for r in rows))
    return path


def _cfg(events: list[Path | str], catalogue: list[Path | str], strict: bool = False, **kw) -> DataConfig:
    services = kw.pop("services", None)
    return DataConfig(
        source="files",
        strict=strict,
        services=services,
        files=FilesConfig(events=[str(p) for p in events], catalogue=[str(p) for p in catalogue], **kw),
    )


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    return _write(tmp_path / "items.csv", ITEMS, ITEM_COLS)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_events_are_ordered_and_split_like_a_plain_loop(
    tmp_path: Path, catalogue: Path, suffix: str, histories, expected_splits, assert_balanced
) -> None:
    events_path = _write(tmp_path / f"events{suffix}", GOOD, EVENT_COLS)
    events, items, events_report, items_report = files.read(_cfg([events_path], [catalogue]))
    assert events.schema == EVENT_SCHEMA and items.schema == ITEM_SCHEMA
    assert _got(events, histories) == _expected(GOOD, expected_splits)
    reordered = sum(
        [r["timestamp"] for r in GOOD if (r["user"], r["service"]) == key]
        != sorted(r["timestamp"] for r in GOOD if (r["user"], r["service"]) == key)
        for key in {(r["user"], r["service"]) for r in GOOD}
    )
    assert reordered > 0 and events_report.notes["histories_reordered_by_timestamp"] == reordered
    one = sum(len(v) == 1 for v in _expected(GOOD, expected_splits).values())
    assert one > 0 and events_report.notes["one_event_histories"] == one
    assert events_report.rows_rejected == 0 and events_report.rows_read == len(GOOD)
    assert_balanced(events_report)
    assert_balanced(items_report)


def test_catalogue_columns_are_parsed(tmp_path: Path, catalogue: Path) -> None:
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS)
    _, items, _, _ = files.read(_cfg([events_path], [catalogue]))
    rows = {(r["service"], r["item_id"]): r for r in items.to_pylist()}
    assert len(rows) == len(ITEMS)
    assert rows["a", "i2"] == {
        "service": "a", "item_id": "i2", "title": "Shoe 2", "categories": ["shoes", "red"], "brand": "Acme",
        "price": 12.5, "text": "a red shoe number 2", "item_text": None,
    }  # fmt: skip
    assert rows["b", "j0"]["brand"] is None and rows["b", "j0"]["price"] is None


def test_categories_as_lists_or_with_another_separator(tmp_path: Path) -> None:
    events_path = _write(tmp_path / "events.csv", [GOOD[0]], EVENT_COLS)
    listed = [{**item, "categories": item["categories"].split("|")} for item in ITEMS]
    separated = [{**item, "categories": item["categories"].replace("|", " ; ")} for item in ITEMS]
    for path, sep in (
        (_write(tmp_path / "l.jsonl", listed, ITEM_COLS), "|"),
        (_write(tmp_path / "s.csv", separated, ITEM_COLS), ";"),
    ):
        _, items, _, _ = files.read(_cfg([events_path], [path], category_separator=sep))
        assert items.column("categories").to_pylist()[0] == ["shoes", "red"]


def test_column_mapping_globs_and_mixed_formats(
    tmp_path: Path, catalogue: Path, histories, expected_splits
) -> None:
    renamed = {"user": "customer", "item_id": "sku", "timestamp": "ts"}
    cols = [renamed.get(c, c) for c in EVENT_COLS]
    rows = [{renamed.get(k, k): v for k, v in r.items()} for r in GOOD]
    _write(tmp_path / "ev-1.csv", rows[:10], cols)
    _write(tmp_path / "ev-2.jsonl", rows[10:], cols)
    events, _, report, _ = files.read(_cfg([tmp_path / "ev-*"], [catalogue], event_columns=renamed))
    assert _got(events, histories) == _expected(GOOD, expected_splits)
    assert report.rows_read == len(GOOD)


@pytest.mark.parametrize(
    ("unit", "convert"),
    [
        ("ms", lambda t: t * 1000 + 999),
        ("iso", lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("iso", lambda t: datetime.fromtimestamp(t + 7200, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+02:00")),
        (
            "iso",
            lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        ),  # naive: UTC
        ("s", lambda t: datetime.fromtimestamp(t, timezone.utc)),  # a Parquet timestamp column
    ],
)
def test_timestamp_units(
    tmp_path: Path, catalogue: Path, unit: str, convert, histories, expected_splits
) -> None:
    rows = [{**r, "timestamp": convert(r["timestamp"])} for r in GOOD]
    events_path = _write(tmp_path / "events.parquet", rows, EVENT_COLS)
    events, _, _, _ = files.read(_cfg([events_path], [catalogue], timestamp_unit=unit))
    assert _got(events, histories) == _expected(GOOD, expected_splits)


def test_service_subset(tmp_path: Path, catalogue: Path) -> None:
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS)
    events, items, report, items_report = files.read(_cfg([events_path], [catalogue], services=["b"]))
    assert set(events.column("service").to_pylist()) == {"b"} == set(items.column("service").to_pylist())
    assert events.num_rows == sum(r["service"] == "b" for r in GOOD)
    assert report.notes["events_in_unselected_services"] == sum(r["service"] == "a" for r in GOOD)
    assert items_report.notes["items_in_unselected_services"] == sum(i["service"] == "a" for i in ITEMS)
    with pytest.raises(DataError, match=r"unknown service\(s\) \['zzz'\].*\['a', 'b'\]"):
        files.read(_cfg([events_path], [catalogue], services=["a", "zzz"]))


def test_order_only_events_keep_the_file_order(
    tmp_path: Path, catalogue: Path, histories, expected_splits
) -> None:
    rows = [{k: v for k, v in r.items() if k != "timestamp"} for r in GOOD]
    rows += [rows[0], rows[1]]  # without timestamps a repeat is another event, kept
    cols = [c for c in EVENT_COLS if c != "timestamp"]
    first = _write(tmp_path / "b-first.jsonl", rows[:15], cols)  # listed first although named after
    second = _write(tmp_path / "a-second.csv", rows[15:], cols)
    events, _, report, _ = files.read(_cfg([first, second], [catalogue], timestamp_unit="none"))
    expected: dict[tuple[str, str], list[tuple]] = {}
    for r in rows:  # the order of the files: no sorting at all
        expected.setdefault((r["user"], r["service"]), []).append(r)
    assert _got(events, histories) == {
        key: [
            (r["item_id"], None, r["event_type"] or "interaction", r["quantity"], r["price"], split)
            for r, split in zip(group, expected_splits(len(group)), strict=True)
        ]
        for key, group in expected.items()
    }
    assert report.rows_rejected == 0 and "histories_reordered_by_timestamp" not in report.notes
    # a timestamp column that is there is ignored too: the file order stands
    timed = _write(tmp_path / "timed.parquet", GOOD, EVENT_COLS)
    events, _, _, _ = files.read(_cfg([timed], [catalogue], timestamp_unit="none"))
    assert events.column("timestamp").null_count == events.num_rows
    assert [r["item_id"] for r in histories(events)["u0", "a"]] == [
        r["item_id"] for r in GOOD if (r["user"], r["service"]) == ("u0", "a")
    ]


def test_one_service_without_a_service_column(tmp_path: Path) -> None:
    items = [{k: v for k, v in item.items() if k != "service"} for item in ITEMS if item["service"] == "a"]
    rows = [{k: v for k, v in r.items() if k != "service"} for r in GOOD if r["service"] == "a"]
    items_path = _write(tmp_path / "items.parquet", items, ITEM_COLS[1:])
    events_path = _write(tmp_path / "events.csv", rows, [c for c in EVENT_COLS if c != "service"])
    events, catalogue, report, _ = files.read(_cfg([events_path], [items_path], default_service="shop"))
    assert (
        set(events.column("service").to_pylist()) == {"shop"} == set(catalogue.column("service").to_pylist())
    )
    assert (events.num_rows, catalogue.num_rows, report.rows_rejected) == (len(rows), len(items), 0)
    with pytest.raises(DataError, match=r"no column 'service'.*data\.files\.item_columns\.service"):
        files.read(_cfg([events_path], [items_path]))
    with pytest.raises(ValueError, match="default_service"):
        FilesConfig(default_service=" ")


def test_a_pre_composed_item_text_column_is_read(tmp_path: Path) -> None:
    items = [{**item, "description": f"Hand-written text of {item['item_id']}"} for item in ITEMS]
    items_path = _write(tmp_path / "items.jsonl", items, [*ITEM_COLS, "description"])
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS)
    _, catalogue, _, _ = files.read(
        _cfg([events_path], [items_path], item_columns={"item_text": "description"})
    )
    rows = {r["item_id"]: r for r in catalogue.to_pylist()}
    assert rows["i2"]["item_text"] == "Hand-written text of i2" and rows["i2"]["title"] == "Shoe 2"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_missing_required_column_names_file_column_and_key(
    tmp_path: Path, catalogue: Path, suffix: str
) -> None:
    events_path = _write(tmp_path / f"events{suffix}", GOOD, [c for c in EVENT_COLS if c != "timestamp"])
    with pytest.raises(DataError, match=r"'timestamp'.*data\.files\.event_columns\.timestamp") as error:
        files.read(_cfg([events_path], [catalogue]))
    assert error.value.where == str(events_path)
    items_path = _write(tmp_path / f"items{suffix}", ITEMS, [c for c in ITEM_COLS if c != "item_id"])
    with pytest.raises(DataError, match=r"data\.files\.item_columns\.item_id") as error:
        files.read(_cfg([events_path], [items_path]))
    assert error.value.where == str(items_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"catalogue": []}, "catalogue is required"),
        ({"events": ["nowhere/*.csv"]}, r"no file matches 'nowhere/\*\.csv'"),
        ({"event_columns": {"usr": "customer"}}, r"event_columns has unknown key\(s\) \['usr'\]"),
        ({"suffix": ".txt"}, "cannot tell the format"),
    ],
)
def test_configuration_errors(tmp_path: Path, catalogue: Path, kwargs: dict, message: str) -> None:
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS)
    if kwargs.pop("suffix", None):
        events_path = events_path.rename(tmp_path / "events.txt")
    args = {"events": [events_path], "catalogue": [catalogue], **kwargs}
    with pytest.raises(DataError, match=message):
        files.read(_cfg(args.pop("events"), args.pop("catalogue"), **args))


def test_explicit_format_overrides_the_suffix(tmp_path: Path, catalogue: Path) -> None:
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS).rename(tmp_path / "events.txt")
    events, _, _, _ = files.read(_cfg([events_path], [catalogue], format="csv"))
    assert events.num_rows == len(GOOD)


def test_text_that_is_not_utf8_is_a_data_error(tmp_path: Path, catalogue: Path) -> None:
    events_path = tmp_path / "events.csv"
    events_path.write_bytes(b"user,service,item_id,timestamp\nu\xff,a,i1,5\n")
    with pytest.raises(DataError, match="not UTF-8") as error:
        files.read(_cfg([events_path], [catalogue]))
    assert error.value.where == str(events_path)


# reason -> (which file, suffix, the bad line appended to it)
BAD_ROWS = {
    "unknown_service": ("events", ".csv", "u1,zzz,i1,500,,,"),
    "item_not_in_catalogue": ("events", ".csv", "u1,a,nope,500,,,"),
    "duplicate_event": ("events", ".csv", "{first}"),
    "bad_timestamp": ("events", ".csv", "u1,a,i1,yesterday,,,"),
    "missing_field": ("events", ".jsonl", '{"service": "a", "item_id": "i1", "timestamp": 5}'),
    "bad_quantity": ("events", ".csv", "u1,a,i1,500,,many,"),
    "bad_price": ("events", ".jsonl", '{"user": "u1", "service": "a", "item_id": "i1", "timestamp": 5, "price": "cheap"}'),
    "wrong_field_count": ("events", ".csv", "u1,a,i1"),
    "malformed_csv": ("events", ".csv", "u1,a," + "x" * 200_000 + ",5,,,"),  # over the csv module's field limit
    "bad_json": ("events", ".jsonl", '{"user": "u1", "service": "a",'),
    "conflicting_item_text": ("catalogue", ".csv", "a,i1,Shoe 1,shoes|red,Acme,11.5,another text"),
    "duplicate_item": ("catalogue", ".csv", "a,i1,Shoe 1,shoes|red,Acme,11.5,a red shoe number 1"),
}  # fmt: skip


def _with_bad_row(tmp_path: Path, reason: str) -> tuple[DataConfig, DataConfig, str]:
    """(non-strict cfg, strict cfg, file:line of the bad row) for good data plus one bad row."""
    which, suffix, line = BAD_ROWS[reason]
    events_path = _write(tmp_path / f"events{suffix if which == 'events' else '.csv'}", GOOD, EVENT_COLS)
    items_path = _write(tmp_path / f"items{suffix if which == 'catalogue' else '.csv'}", ITEMS, ITEM_COLS)
    target = events_path if which == "events" else items_path
    lines = target.read_text().splitlines()
    lines.append(line.replace("{first}", lines[1]))
    target.write_text("\n".join(lines) + "\n")
    where = f"{target}:{len(lines)}"
    return _cfg([events_path], [items_path]), _cfg([events_path], [items_path], strict=True), where


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_is_counted_and_nothing_else_is_lost(
    tmp_path: Path, reason: str, histories, expected_splits, assert_balanced
) -> None:
    cfg, _, where = _with_bad_row(tmp_path, reason)
    events, items, events_report, items_report = files.read(cfg)
    report = items_report if BAD_ROWS[reason][0] == "catalogue" else events_report
    assert dict(report.rejected) == {reason: 1}
    assert report.examples[0].startswith(f"{where}: {reason}")
    assert events_report.rows_rejected + items_report.rows_rejected == 1
    assert _got(events, histories) == _expected(GOOD, expected_splits)
    assert items.num_rows == len(ITEMS)
    assert "another text" not in items.column("text").to_pylist()
    assert_balanced(events_report)
    assert_balanced(items_report)


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_in_strict_mode_names_file_and_line(tmp_path: Path, reason: str) -> None:
    _, strict, where = _with_bad_row(tmp_path, reason)
    with pytest.raises(DataError, match=reason) as error:
        files.read(strict)
    assert error.value.where == where


def test_bad_value_in_parquet_names_the_row(tmp_path: Path, catalogue: Path) -> None:
    rows = [{**r, "timestamp": str(r["timestamp"])} for r in GOOD]
    rows[4]["timestamp"] = "soon"
    events_path = _write(tmp_path / "events.parquet", rows, EVENT_COLS)
    events, _, report, _ = files.read(_cfg([events_path], [catalogue]))
    assert dict(report.rejected) == {"bad_timestamp": 1} and events.num_rows == len(GOOD) - 1
    with pytest.raises(DataError, match="bad_timestamp") as error:
        files.read(_cfg([events_path], [catalogue], strict=True))
    assert error.value.where == f"{events_path}:5"


def test_good_data_reads_in_strict_mode(tmp_path: Path, catalogue: Path, histories, expected_splits) -> None:
    events_path = _write(tmp_path / "events.jsonl", GOOD, EVENT_COLS)
    events, _, _, _ = files.read(_cfg([events_path], [catalogue], strict=True))
    assert _got(events, histories) == _expected(GOOD, expected_splits)


def test_byte_order_mark_is_ignored(tmp_path: Path, catalogue: Path) -> None:
    events_path = _write(tmp_path / "events.csv", GOOD, EVENT_COLS)
    events_path.write_bytes(b"\xef\xbb\xbf" + events_path.read_bytes())  # as spreadsheet programs write CSV
    events, _, _, _ = files.read(_cfg([events_path], [catalogue], strict=True))
    assert events.num_rows == len(GOOD)
