"""Tests of the Amazon 2014 reader: a miniature three-domain folder, and the real benchmark when present."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest

from moe_rec.data.config import DataConfig
from moe_rec.data.schema import DataError
from moe_rec.data.sources import amazon2014

# domain -> (id2user, id2item, sequential lines as [user index, item indices...])
MINI = {
    "beauty": (
        {1: "R1", 2: "R2", 3: "R3"},
        {1: "B01", 2: "B02", 3: "B03", 4: "B04"},
        [[1, 1, 2, 3, 4], [2, 2, 1], [3, 4]],
    ),
    "sports": ({1: "R2", 2: "R4"}, {1: "S01", 2: "S02", 3: "S03"}, [[1, 1, 2, 3], [2, 3, 1, 3]]),
    "toys": ({1: "R1", 2: "R2", 3: "R5"}, {1: "T01", 2: "T02"}, [[1, 1, 2], [2, 2, 1, 2], [3]]),
}
TSV_HEADER = "item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\tprice:float\tbrand:token"
TSV_CLEAN = [
    "B01\tRed Lipstick &amp; Gloss\tBeauty\t100.0\t'Beauty', 'Makeup', 'Lips'\t5.5\tAcme",
    'B02\t"Perfume \t Deluxe"\tBeauty\t5.0\t"\'Beauty\', \'Fragrance\', ""Women\'s"""\t20\tPrada',
    'B03\t"Hand\nCream"\t\t\t\'Beauty\', ""Men\'s""\tabout 5\tNeem',
]
TSV_MESSY = TSV_CLEAN + [
    "B04\t\"Broken title\tBeauty\t1.0\t'Beauty'\t1.0\tX",  # unclosed quote: line 6, skipped
    "B99\tGhost\tBeauty\t1.0\t'Beauty'\t1.0\tX",  # not in id2item
    "B01\tRed Lipstick\tBeauty\t100.0\t'Beauty'\t5.5\tAcme",  # second row of B01
]


def _make(root: Path, tsv_rows: list[str] = TSV_CLEAN, lines: dict[str, list[str]] | None = None) -> Path:
    """Write the miniature folder; ``lines`` replaces a domain's ``sequential.txt`` lines."""
    for domain, (users, items, sequences) in MINI.items():
        folder = root / domain
        folder.mkdir(parents=True)
        maps = {
            "id2user": {str(k): v for k, v in users.items()},
            "id2item": {str(k): v for k, v in items.items()},
        }
        (folder / "datamaps.json").write_text(json.dumps(maps, indent=4))
        text = (lines or {}).get(domain) or [" ".join(map(str, seq)) for seq in sequences]
        (folder / "sequential.txt").write_text("\n".join(text) + "\n")
        (folder / "item_keywords.txt").write_text("".join(f"{a} {a.lower()} words\n" for a in items.values()))
    (root / "beauty" / "items.tsv").write_text("\n".join([TSV_HEADER, *tsv_rows]) + "\n")
    return root


def _read(root: Path, strict: bool = False, services: list[str] | None = None):
    return amazon2014.read(DataConfig(source="amazon2014", path=root, strict=strict, services=services))


def test_histories_follow_sequential_order_with_reviewer_ids(
    tmp_path: Path, histories, expected_splits, assert_balanced
) -> None:
    events, items, report, items_report = _read(_make(tmp_path))
    expected = {}
    for domain, (users, id2item, sequences) in MINI.items():
        for user, *seq in sequences:
            if seq:
                expected[users[user], domain] = [id2item[i] for i in seq]
    got = histories(events)
    assert {key: [r["item_id"] for r in rows] for key, rows in got.items()} == expected
    for rows in got.values():
        assert [r["split"] for r in rows] == expected_splits(len(rows))
        assert all(r["timestamp"] is None and r["event_type"] == "review" for r in rows)
    assert {u for u, s in got if s != "beauty"} & {u for u, s in got if s == "beauty"} == {"R1", "R2"}
    assert report.notes["empty_histories"] == 1  # R5's toys line has no items, and R5 is nowhere else
    assert report.notes["one_event_histories"] == sum(len(v) == 1 for v in expected.values())
    assert items.num_rows == sum(len(m[1]) for m in MINI.values())
    assert_balanced(report)
    assert_balanced(items_report)


def test_catalogue_text_and_beauty_details(tmp_path: Path) -> None:
    _, items, _, report = _read(_make(tmp_path))
    rows = {(r["service"], r["item_id"]): r for r in items.to_pylist()}
    assert rows["sports", "S02"] == {
        "service": "sports", "item_id": "S02", "title": None, "categories": [], "brand": None, "price": None,
        "text": "s02 words", "item_text": None,
    }  # fmt: skip
    assert rows["beauty", "B01"]["title"] == "Red Lipstick & Gloss"
    assert rows["beauty", "B01"]["categories"] == ["Beauty", "Makeup", "Lips"]
    assert rows["beauty", "B01"]["price"] == 5.5 and rows["beauty", "B01"]["brand"] == "Acme"
    assert rows["beauty", "B02"]["title"] == "Perfume Deluxe"
    assert rows["beauty", "B02"]["categories"] == ["Beauty", "Fragrance", "Women's"]
    assert rows["beauty", "B03"]["title"] == "Hand Cream"
    assert rows["beauty", "B03"]["categories"] == ["Beauty", "Men's"]
    assert rows["beauty", "B03"]["price"] is None and rows["beauty", "B03"]["brand"] == "Neem"
    assert dict(report.notes) == {
        "items_tsv_tab_in_field": 1,
        "items_tsv_line_break_in_field": 1,
        "items_tsv_categories_repaired": 1,
        "items_tsv_unparsable_price": 1,
        "items_without_items_tsv_row": 1,
    }
    assert report.rows_rejected == 0


def test_messy_items_tsv_is_skipped_row_by_row(tmp_path: Path) -> None:
    root = _make(tmp_path, TSV_MESSY)
    _, items, _, report = _read(root)
    rows = {(r["service"], r["item_id"]): r for r in items.to_pylist()}
    assert rows["beauty", "B04"]["title"] is None and rows["beauty", "B04"]["text"] == "b04 words"
    assert rows["beauty", "B01"]["title"] == "Red Lipstick & Gloss"  # the first row of B01 wins
    for reason in ("items_tsv_unparsable_row", "items_tsv_unknown_item", "items_tsv_duplicate_item"):
        assert report.notes[reason] == 1, reason
    assert report.notes["items_without_items_tsv_row"] == 1
    with pytest.raises(DataError, match="items_tsv_unparsable_row") as error:
        _read(root, strict=True)
    assert error.value.where == f"{root / 'beauty' / 'items.tsv'}:6"


# reason -> (domain, sequential.txt lines, 1-based line of the bad row, events of that line kept)
BAD_LINES = {
    "unknown_item_index": ("sports", ["1 1 2 3", "2 3 99 1 3"], 2, ["S03", "S01", "S03"]),
    "unknown_user_index": ("sports", ["1 1 2 3", "7 3 1"], 2, []),
    "duplicate_user_line": ("toys", ["1 1 2", "2 2 1 2", "1 2", "3"], 3, []),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_sequence_line(tmp_path: Path, reason: str, histories, assert_balanced) -> None:
    domain, lines, bad_line, kept = BAD_LINES[reason]
    root = _make(tmp_path, lines={domain: lines})
    events, _, report, _ = _read(root)
    bad_tokens = len(lines[bad_line - 1].split()) - 1 - len(kept)
    assert dict(report.rejected) == {reason: bad_tokens}
    assert report.examples[0].startswith(f"{root / domain / 'sequential.txt'}:{bad_line}: {reason}")
    users = MINI[domain][0]
    bad_user = users.get(int(lines[bad_line - 1].split()[0]))
    if kept:
        assert [r["item_id"] for r in histories(events)[bad_user, domain]] == kept
    assert_balanced(report)
    with pytest.raises(DataError, match=reason) as error:
        _read(root, strict=True)
    assert error.value.where == f"{root / domain / 'sequential.txt'}:{bad_line}"


def test_service_subset_and_unknown_service(tmp_path: Path) -> None:
    root = _make(tmp_path)
    events, items, _, _ = _read(root, services=["toys", "sports"])
    assert (
        set(events.column("service").to_pylist())
        == {"sports", "toys"}
        == set(items.column("service").to_pylist())
    )
    with pytest.raises(DataError, match=r"unknown service\(s\) \['music'\].*\['beauty', 'sports', 'toys'\]"):
        _read(root, services=["music"])


def test_missing_folder_and_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="amazon2014 folder not found"):
        _read(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no domain subfolders"):
        _read(tmp_path)
    root = _make(tmp_path / "data")
    (root / "toys" / "datamaps.json").unlink()
    with pytest.raises(DataError, match="missing datamaps.json") as error:
        _read(root)
    assert error.value.where == str(root / "toys" / "datamaps.json")
    (root / "sports" / "item_keywords.txt").unlink()
    with pytest.raises(DataError, match="missing item_keywords.txt"):
        _read(root, services=["sports"])


def test_keyword_problems_are_counted(tmp_path: Path) -> None:
    root = _make(tmp_path)
    (root / "toys" / "item_keywords.txt").write_text("T01 red car\nT01 again\nX77 ghost\n")
    _, items, _, report = _read(root, services=["toys"])
    assert items.column("text").to_pylist() == ["red car", None]
    assert {k: report.notes[k] for k in ("duplicate_keywords_line", "keywords_for_unknown_item")} == {
        "duplicate_keywords_line": 1,
        "keywords_for_unknown_item": 1,
    }
    assert report.notes["items_without_keywords"] == 1
    with pytest.raises(DataError, match="duplicate_keywords_line") as error:
        _read(root, strict=True, services=["toys"])
    assert error.value.where == f"{root / 'toys' / 'item_keywords.txt'}:2"


# ---- the real benchmark (../shared/data/amazon2014) -------------------------------------------------

PUBLISHED = {
    "beauty": (22_363, 12_101, 198_502),
    "sports": (35_598, 18_357, 296_337),
    "toys": (19_412, 11_924, 167_597),
}


@pytest.fixture(scope="module")
def real(shared_data: Path) -> tuple[Path, pa.Table, pa.Table, object, object]:
    root = shared_data / "amazon2014"
    if not root.is_dir():
        pytest.skip(f"no {root}")
    return (root, *_read(root, strict=True))  # strict: the real files read without a single rejection


@pytest.mark.real_data
def test_real_counts_match_the_published_ones(real) -> None:
    _, events, items, report, items_report = real
    users_by_service = {}
    for service, (n_users, n_items, n_events) in PUBLISHED.items():
        mask = [s == service for s in events.column("service").to_pylist()]
        users_by_service[service] = set(events.filter(pa.array(mask)).column("user").to_pylist())
        assert len(users_by_service[service]) == n_users, service
        assert sum(mask) == n_events, service
        assert items.column("service").to_pylist().count(service) == n_items, service
    b, s, t = users_by_service["beauty"], users_by_service["sports"], users_by_service["toys"]
    assert (len(b & s), len(b & t), len(s & t), len(b & s & t), len(b | s | t)) == (
        1_625,
        2_073,
        1_734,
        741,
        72_682,
    )
    assert report.rows_read == report.rows_kept == events.num_rows
    assert items_report.rows_kept == items.num_rows


@pytest.mark.real_data
def test_real_splits_are_the_published_leave_one_out(real, histories) -> None:
    root, events, _, _, _ = real
    got = histories(events)
    for service in PUBLISHED:
        maps = json.loads((root / service / "datamaps.json").read_text())
        for line in (root / service / "sequential.txt").read_text().splitlines():
            user, *seq = line.split()
            rows = got[maps["id2user"][user], service]
            assert [r["item_id"] for r in rows] == [maps["id2item"][i] for i in seq]
            assert rows[-1]["split"] == "test" and rows[-1]["item_id"] == maps["id2item"][seq[-1]]
            assert rows[-2]["split"] == "valid" and rows[-2]["item_id"] == maps["id2item"][seq[-2]]
            assert {r["split"] for r in rows[:-2]} <= {"train"}


@pytest.mark.real_data
def test_real_beauty_item_details(real) -> None:
    root, _, items, _, items_report = real
    beauty = [r for r in items.to_pylist() if r["service"] == "beauty"]
    with (root / "beauty" / "items.tsv").open(newline="") as f:  # independent: the csv module, whole file
        raw = list(csv.DictReader(f, delimiter="\t"))
    assert sum(r["title"] is not None for r in beauty) == 12_094  # README
    assert sum(r["price"] is not None for r in beauty) == 11_516  # README
    assert sum(r["brand"] is not None for r in beauty) == sum(bool(r["brand:token"].strip()) for r in raw)
    assert sum(bool(r["categories"]) for r in beauty) == sum(bool(r["categories:token_seq"]) for r in raw)
    by_id = {r["item_id"]: r for r in beauty}
    assert by_id["B0001ZYL3Q"]["title"] == "TheraNeem Cream - Original Organix South 2 oz Cream Vanilla"
    assert by_id["B000SDI6MI"]["title"] == "- DESIGNER SKIN ANGEL KIWI PEAR MOISTURIZING BODY LOTION 20 OZ"
    assert by_id["B000SDI6MI"]["brand"] == "Designer Skin"
    assert by_id["9788072216"]["categories"] == ["Beauty", "Fragrance", "Women's", "Eau de Parfum"]
    # one title spans two lines, two titles hold a tab (awk -F'\t' '{print NF}' items.tsv); nothing skipped
    assert dict(items_report.notes) == {"items_tsv_line_break_in_field": 1, "items_tsv_tab_in_field": 2}
    assert items_report.rows_rejected == 0
