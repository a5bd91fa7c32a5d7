"""``prepare`` and the prepared directory's readers: one-service order-only files with their own
item text, and bad input (a source whose every row is rejected stops before anything is written,
a damaged shard is named with what to do)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_rec.data import store
from moe_rec.data.config import DataConfig, FilesConfig
from moe_rec.data.prepare import prepare
from moe_rec.data.schema import DataError
from moe_rec.sid.item_text import item_texts


def _files_source(tmp_path: Path, timestamps: list[str], **files: object) -> DataConfig:
    events = tmp_path / "events.csv"
    events.write_text(
        "user,service,item_id,timestamp\n" + "".join(f"u1,shop,{i},{t}\n" for i, t in zip("abc", timestamps))
    )
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"service": "shop", "item_id": i, "title": i}) + "\n" for i in "abc"))
    return DataConfig(
        source="files", files=FilesConfig(events=[str(events)], catalogue=[str(items)], **files)
    )


def test_every_row_rejected_stops_with_the_count_by_reason(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare(_files_source(tmp_path, ["100", "200", "300"]), out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    wrong_unit = _files_source(tmp_path, ["100", "200", "xyz"], timestamp_unit="iso")
    with pytest.raises(DataError) as error:
        prepare(wrong_unit, out)
    message = str(error.value)
    assert "all 3 rows" in message and "bad_timestamp 3" in message
    assert f"{tmp_path / 'events.csv'}:2" in message  # the first rejected row, as an example
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing replaced


def test_a_source_with_no_rows_stops_before_writing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        prepare(_files_source(tmp_path, []), tmp_path / "data")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("sub", [store.ITEMS_DIR, store.EVENTS_DIR])
def test_a_truncated_shard_is_named_with_what_to_do(tmp_path: Path, sub: str) -> None:
    out = tmp_path / "data"
    prepare(_files_source(tmp_path, ["100", "200", "300"]), out)
    shard = sorted((out / sub).glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        store.load_table(out, sub)
    message = str(error.value)
    assert str(shard) in message and "moe-rec data prepare" in message


def test_one_service_order_only_files_with_their_own_item_text(tmp_path: Path) -> None:
    """No timestamp and no service column, a pre-composed text: the file order is the history."""
    events = tmp_path / "events.csv"
    events.write_text("user,item_id\n" + "".join(f"u1,{i}\n" for i in "cab") + "u2,a\nu2,a\n")
    items = tmp_path / "items.csv"
    items.write_text(
        'item_id,title,blurb\na,Apple,"A crisp apple, picked today"\nb,Bread,\nc,Cake,Chocolate cake\n'
    )
    files = FilesConfig(
        events=[str(events)], catalogue=[str(items)], timestamp_unit="none", default_service="shop",
        item_columns={"item_text": "blurb"},
    )  # fmt: skip
    stats = prepare(DataConfig(source="files", files=files), tmp_path / "data")
    assert stats["services"]["shop"]["interactions"] == 5
    got = store.load_table(tmp_path / "data").to_pylist()
    assert [(r["user"], r["item_id"], r["timestamp"], r["split"]) for r in got] == [
        ("u1", "c", None, "train"), ("u1", "a", None, "valid"), ("u1", "b", None, "test"),
        ("u2", "a", None, "train"), ("u2", "a", None, "test"),
    ]  # fmt: skip
    catalogue = store.load_table(tmp_path / "data", store.ITEMS_DIR)
    assert item_texts(catalogue) == ["A crisp apple, picked today", "Bread.", "Chocolate cake"]
