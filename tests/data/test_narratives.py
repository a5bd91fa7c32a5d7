"""Narratives: held-out families only in test, no title or id of the target or of any history
item, targets and histories against the events, reasons that the history supports, missing
metadata, determinism; on a small synthetic run and a hand-made catalogue."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moe_rec.data import store
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.critique_config import CritiqueConfig, NarrativeConfig
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.narratives import build_narratives
from moe_rec.data.schema import ReadReport
from moe_rec.data.sources import synthetic
from moe_rec.data.wording import NARRATIVE_FAMILIES

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("narratives")
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=200, items_per_service=300, users_per_shard=100))
    synthetic.write(cfg, root / "data")
    return root, build_narratives(root / "data", root / "narratives", CritiqueConfig())


def _rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def _histories(data: Path) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for e in sorted(
        store.load_table(data).to_pylist(), key=lambda e: (e["user"], e["service"], e["position"])
    ):
        out.setdefault((e["user"], e["service"]), []).append(e)
    return out


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def test_held_out_families_only_in_test(run: tuple[Path, dict]) -> None:
    root, stats = run
    held = set(NarrativeConfig().held_out_families)
    for split in ("train", "valid"):
        rows = _rows(root / "narratives", split)
        assert rows and not any(r["family"] in held or r["held_out"] for r in rows)
    test = _rows(root / "narratives", "test")
    assert {r["family"] for r in test} == set(NARRATIVE_FAMILIES)
    assert all(r["held_out"] == (r["family"] in held) for r in test)
    assert stats["held_out_rows"]["test"] == sum(r["held_out"] for r in test)


def test_no_narrative_names_an_item(run: tuple[Path, dict]) -> None:
    """Neither the target's title or id nor the id of any item in the history appears."""
    root, _ = run
    titles = {
        (r["service"], r["item_id"]): r["title"] for r in store.load_table(root / "data", "items").to_pylist()
    }
    history = _histories(root / "data")
    for split in SPLITS:
        for r in _rows(root / "narratives", split):
            text = _words(r["text"])
            assert _words(titles[r["service"], r["target_item"]]) not in text, r
            for e in history[r["user"], r["service"]][: r["position"] + 1]:
                assert f" {e['item_id'].lower()} " not in text, r


def test_targets_and_histories_follow_the_splits(run: tuple[Path, dict]) -> None:
    root, _ = run
    history = _histories(root / "data")
    expected = {
        split: {
            (u, s, e["position"])
            for (u, s), h in history.items()
            for e in h
            if e["split"] == split and e["position"] > 0
        }
        for split in SPLITS
    }
    for split in SPLITS:
        rows = _rows(root / "narratives", split)
        got = {(r["user"], r["service"], r["position"]) for r in rows}
        assert got <= expected[split] and len(got) == len(rows)
        assert len(got) >= 0.9 * len(expected[split])  # the rest: nothing to say or a title named
        for r in rows:
            target = history[r["user"], r["service"]][r["position"]]
            assert (target["item_id"], target["split"], r["history_len"]) == (
                r["target_item"],
                split,
                r["position"],
            )


def test_last_train_target_only(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = run
    cfg = CritiqueConfig(narratives=NarrativeConfig(train_targets="last"))
    build_narratives(root / "data", tmp_path / "n", cfg)
    history = _histories(root / "data")
    rows = _rows(tmp_path / "n", "train")
    assert len({(r["user"], r["service"]) for r in rows}) == len(rows)
    for r in rows:
        h = history[r["user"], r["service"]]
        assert r["position"] == max(e["position"] for e in h if e["split"] == "train")


def test_reasons_are_in_the_history(run: tuple[Path, dict]) -> None:
    """``same_brand`` / ``same_leaf`` / ``same_department``: an earlier item of the history has the
    target's brand / leaf category / department; ``none``: no earlier item shares any of them."""
    root, stats = run
    items = {(r["service"], r["item_id"]): r for r in store.load_table(root / "data", "items").to_pylist()}
    history = _histories(root / "data")
    assert {"same_leaf", "same_brand", "same_department", "none"} <= set(stats["why"]["train"])
    for r in _rows(root / "narratives", "train")[:3000]:
        target = items[r["service"], r["target_item"]]
        earlier = [
            items[r["service"], e["item_id"]] for e in history[r["user"], r["service"]][: r["position"]]
        ]
        shares = {
            "same_brand": any(i["brand"] == target["brand"] for i in earlier),
            "same_leaf": any(i["categories"][-1] == target["categories"][-1] for i in earlier),
            "same_department": any(i["categories"][0] == target["categories"][0] for i in earlier),
        }
        if r["why"] in shares:
            assert shares[r["why"]], r
        if r["why"] == "none":
            assert not any(shares.values()), r


def test_same_seed_same_narratives(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = run
    build_narratives(root / "data", tmp_path / "again", CritiqueConfig())
    for split in SPLITS:
        assert pq.read_table(tmp_path / "again" / f"{split}.parquet").equals(
            pq.read_table(root / "narratives" / f"{split}.parquet")
        )


def test_missing_brand_and_price_are_left_out(tmp_path: Path) -> None:
    cat = CatalogueBuilder(["s"], ReadReport("items"))
    cat.add(
        "s", "a", "a", title="Hydrating argan cream", categories=["Face", "Creams"], brand="Acme", price=5.0
    )
    cat.add("s", "b", "b", title="Gentle jojoba wash", categories=["Face", "Cleansers"])
    events = EventBuilder(["s"], cat.keys(), ReadReport("events"))
    for n, item in enumerate(["a", "b", "a", "b"]):
        events.add("u", "s", item, f"e{n}")
    store.write_items(cat.finish(), tmp_path / "data")
    store.write_events(events.finish(), tmp_path / "data", 1)
    cfg = CritiqueConfig(min_term_df=1, max_term_share=1.0)
    build_narratives(tmp_path / "data", tmp_path / "n", cfg)
    rows = [r for s in SPLITS for r in _rows(tmp_path / "n", s)]
    into_b = [r for r in rows if r["target_item"] == "b"]
    assert into_b and all("brand" not in r["parts"] and "price" not in r["parts"] for r in into_b)
    assert all("category" in r["parts"] for r in rows)
