"""Tests of the food + kitchen reader: a miniature folder, and the real files when present."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from moe_rec.data.config import DataConfig
from moe_rec.data.schema import DataError
from moe_rec.data.sources import food_kitchen

# (first column, ASIN, local index): rows shuffled and first columns unrelated, so only local_index maps
FOOD = [(100, "F_A", 2), (7, "F_B", 0), (55, "F_C", 1)]
KITCHEN = [(900, "K_A", 1), (901, "K_B", 0)]
USERS = ["RA", "RB", "RC", "RD", "RE"]  # RD and RE have no events in the clean folder
# file -> lines of (user index, [(item number, unix time)]); item numbers: food local n, kitchen 3 + local
HISTORIES = {
    "validdata_new.txt": [(0, [(1, 300), (3, 100), (0, 200), (4, 150)])],
    "testdata_new.txt": [(1, [(2, 50), (2, 60), (4, 70)]), (2, [(0, 10), (1, 20), (3, 5)])],
}


def _event(number: int | str, ts: int | str) -> str:
    return f"{number}|{ts}|2013-01-01 08:00:00|"


def _line(user: int, events: list[tuple[int, int]]) -> str:
    return "\t".join([str(user), str(user + 10), *(_event(n, t) for n, t in events)])


def _make(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("Alist.txt", FOOD), ("Blist.txt", KITCHEN)):
        (root / name).write_text("".join(f"{i}\t{asin}\t{local}\n" for i, asin, local in rows))
    (root / "userlist.txt").write_text("".join(f"{u}\t{k}\n" for k, u in enumerate(USERS)))
    for name, lines in HISTORIES.items():
        (root / name).write_text("".join(_line(u, ev) + "\n" for u, ev in lines))
    return root


def _expected(lines: list[tuple[int, list[tuple[int, int]]]], expected_splits) -> dict:
    """Independent reference: map numbers by local index, stable-sort each service by time, split."""
    food = {local: asin for _, asin, local in FOOD}
    kitchen = {local + len(FOOD): asin for _, asin, local in KITCHEN}
    out: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for user, events in lines:
        for number, ts in events:
            service, asin = ("food", food[number]) if number in food else ("kitchen", kitchen[number])
            out.setdefault((USERS[user], service), []).append((asin, ts))
    return {
        key: [(*e, s) for e, s in zip(sorted(ev, key=lambda e: e[1]), expected_splits(len(ev)), strict=True)]
        for key, ev in out.items()
    }


def _got(events: pa.Table, histories) -> dict:
    return {
        k: [(r["item_id"], r["timestamp"], r["split"]) for r in rows] for k, rows in histories(events).items()
    }


def _read(root: Path, strict: bool = False, services: list[str] | None = None):
    return food_kitchen.read(DataConfig(source="food_kitchen", path=root, strict=strict, services=services))


ALL_LINES = [line for lines in HISTORIES.values() for line in lines]


@pytest.mark.parametrize("strict", [False, True])
def test_histories_are_sorted_by_time_per_service(
    tmp_path: Path, strict: bool, histories, expected_splits, assert_balanced
) -> None:
    events, items, report, items_report = _read(_make(tmp_path), strict=strict)
    assert _got(events, histories) == _expected(ALL_LINES, expected_splits)
    assert set(events.column("event_type").to_pylist()) == {"review"}
    assert sorted(zip(items.column("service").to_pylist(), items.column("item_id").to_pylist(), strict=True)) == [
        ("food", "F_A"), ("food", "F_B"), ("food", "F_C"), ("kitchen", "K_A"), ("kitchen", "K_B"),
    ]  # fmt: skip
    assert items.column("text").null_count == items.num_rows
    assert report.notes["histories_reordered_by_timestamp"] == 1  # RA's food: 300 before 200
    assert report.notes["lines_out_of_time_order"] == 2  # RA and RC interleave services out of order
    assert report.notes["one_event_histories"] == 2  # RB's and RC's kitchen
    assert report.notes["empty_histories"] == 2  # RD, RE
    assert_balanced(report)
    assert_balanced(items_report)


def test_service_subset_and_unknown_service(tmp_path: Path, histories, expected_splits) -> None:
    root = _make(tmp_path)
    events, items, report, _ = _read(root, services=["kitchen"])
    expected = {k: v for k, v in _expected(ALL_LINES, expected_splits).items() if k[1] == "kitchen"}
    assert _got(events, histories) == expected
    assert set(items.column("service").to_pylist()) == {"kitchen"}
    assert report.notes["events_in_unselected_services"] == sum(
        n < len(FOOD) for _, ev in ALL_LINES for n, _ in ev
    )
    with pytest.raises(DataError, match=r"unknown service\(s\) \['toys'\].*\['food', 'kitchen'\]"):
        _read(root, services=["toys"])


def test_missing_folder_or_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="food_kitchen folder not found"):
        _read(tmp_path / "nowhere")
    root = _make(tmp_path / "fk")
    (root / "userlist.txt").unlink()
    with pytest.raises(DataError, match="missing userlist.txt") as error:
        _read(root)
    assert error.value.where == str(root / "userlist.txt")


# reason -> (file, line appended, rejected count, RE's events that stay, which report)
BAD = {
    "malformed_event": ("testdata_new.txt", f"4\t14\t{_event(0, 10)}\tgarbage\t{_event(1, 20)}", 1, [(0, 10), (1, 20)]),
    "malformed_event_time": ("testdata_new.txt", f"4\t14\t{_event(0, 'ten')}\t{_event(1, 20)}", 1, [(1, 20)]),
    "unknown_item_index": ("testdata_new.txt", f"4\t14\t{_event(0, 10)}\t{_event(99, 20)}", 1, [(0, 10)]),
    "unknown_user_index": ("testdata_new.txt", f"77\t14\t{_event(0, 10)}\t{_event(1, 20)}", 2, []),
    "duplicate_user_line": ("testdata_new.txt", f"0\t10\t{_event(0, 999)}", 1, []),
    "duplicate_event": ("testdata_new.txt", f"4\t14\t{_event(0, 10)}\t{_event(0, 10)}\t{_event(1, 20)}", 1, [(0, 10), (1, 20)]),
    "malformed_item_line": ("Alist.txt", "garbage", 1, []),
    "duplicate_local_index": ("Blist.txt", "902\tK_C\t0", 1, []),
}  # fmt: skip


def _with_bad_line(root: Path, case: str) -> tuple[Path, str]:
    name, line, _, _ = BAD[case]
    path = _make(root) / name
    n_lines = len(path.read_text().splitlines()) + 1
    path.write_text(path.read_text() + line + "\n")
    return root, f"{path}:{n_lines}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_is_counted_and_nothing_else_is_lost(
    tmp_path: Path, case: str, histories, expected_splits, assert_balanced
) -> None:
    root, where = _with_bad_line(tmp_path, case)
    name, _, count, kept = BAD[case]
    reason = case.removesuffix("_time")
    events, items, report, items_report = _read(root)
    bad_report = items_report if name.endswith("list.txt") else report
    assert dict(bad_report.rejected) == {reason: count}
    assert bad_report.examples[0].startswith(f"{where}: {reason}")
    assert report.rows_rejected + items_report.rows_rejected == count
    assert _got(events, histories) == _expected([*ALL_LINES, (4, kept)], expected_splits)
    assert items.num_rows == len(FOOD) + len(KITCHEN)
    assert_balanced(report)
    assert_balanced(items_report)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_in_strict_mode_names_file_and_line(tmp_path: Path, case: str) -> None:
    root, where = _with_bad_line(tmp_path, case)
    with pytest.raises(DataError, match=case.removesuffix("_time")) as error:
        _read(root, strict=True)
    assert error.value.where == where


# ---- the real files (../shared/data/food_kitchen) ---------------------------------------------------


@pytest.fixture(scope="module")
def real(shared_data: Path):
    root = shared_data / "food_kitchen"
    if not root.is_dir():
        pytest.skip(f"no {root}")
    return (root, *_read(root, strict=True))  # strict: the real files read without a single rejection


def _real_lines(root: Path) -> list[tuple[int, list[tuple[int, int]]]]:
    """Independent parse of the two history files: (user index, [(item number, time)])."""
    out = []
    for name in ("validdata_new.txt", "testdata_new.txt"):
        for line in (root / name).read_text().splitlines():
            user, _, *events = line.split("\t")
            out.append((int(user), [(int(e.split("|")[0]), int(e.split("|")[1])) for e in events if e]))
    return out


@pytest.mark.real_data
def test_real_counts(real) -> None:
    root, events, items, report, items_report = real
    n_food = len((root / "Alist.txt").read_text().splitlines())
    lines = _real_lines(root)
    services = events.column("service").to_pylist()
    assert len(lines) == len(set(events.column("user").to_pylist())) == 16_579
    assert services.count("food") == sum(n < n_food for _, ev in lines for n, _ in ev)
    assert services.count("kitchen") == sum(n >= n_food for _, ev in lines for n, _ in ev)
    assert events.num_rows == sum(len(ev) for _, ev in lines)
    assert items.column("service").to_pylist().count("food") == n_food == 29_207
    assert items.column("service").to_pylist().count("kitchen") == 34_886
    assert report.rows_read == report.rows_kept and "empty_histories" not in report.notes
    assert items_report.rows_read == items_report.rows_kept == items.num_rows


@pytest.mark.real_data
def test_real_test_item_is_the_latest_event_per_service(real, histories) -> None:
    root, events, _, _, _ = real
    asins = {}  # item number -> (service, ASIN), from the local_index column: kitchen numbers follow food
    for name, service, offset in (("Alist.txt", "food", 0), ("Blist.txt", "kitchen", 29_207)):
        for line in (root / name).read_text().splitlines():
            _, asin, local = line.split("\t")
            asins[offset + int(local)] = (service, asin)
    users = dict(line.split("\t")[::-1] for line in (root / "userlist.txt").read_text().splitlines())
    got = histories(events)
    for user, line_events in _real_lines(root):
        for service in ("food", "kitchen"):
            mine = [(asins[n][1], t) for n, t in line_events if asins[n][0] == service]
            ordered = sorted(mine, key=lambda e: e[1])  # stable: ties keep the line's order
            rows = got[users[str(user)], service]
            assert [(r["item_id"], r["timestamp"]) for r in rows] == ordered
            assert rows[-1]["split"] == "test"
            assert len(rows) < 3 or rows[-2]["split"] == "valid"
