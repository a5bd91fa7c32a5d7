"""Critiques: item attributes, price bands, the leakage guard and check, held-out families, the
pairs a split may use, determinism, and missing metadata; on hand-made catalogues and on a small
synthetic run, each checked against an independent computation."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_rec.config import ConfigError, load_config
from moe_rec.data import store, wording
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.critiques import build_critiques, changes, critique_pair, load_rows
from moe_rec.data.histories import CatalogueBuilder, EventBuilder
from moe_rec.data.item_attributes import (
    Size,
    parse_colour,
    parse_pack,
    parse_size,
    price_bands,
    service_attributes,
)
from moe_rec.data.leakage import BM25, mentions, retrieval_leakage
from moe_rec.data.schema import ReadReport
from moe_rec.data.sources import synthetic
from moe_rec.experiment import ExperimentConfig

SPLITS = ("train", "valid", "test")
# 600 items per synthetic service make 48 leaf categories of about 12 items: a guard of 10 lets
# critiques name them (the default 20 is sized for real catalogues)
SYNTHETIC = CritiqueConfig(min_matching_items=10)


# -- small prepared data sets ---------------------------------------------------------------------


def _write(out: Path, items: list[dict], histories: dict[tuple[str, str], list[str]]) -> Path:
    """A prepared data directory from catalogue rows and ``(user, service) -> item ids`` in order."""
    services = sorted({i["service"] for i in items})
    cat = CatalogueBuilder(services, ReadReport("items"))
    for n, item in enumerate(items):
        cat.add(where=f"item{n}", **item)
    events = EventBuilder(services, cat.keys(), ReadReport("events"))
    for (user, service), ids in histories.items():
        for n, item in enumerate(ids):
            events.add(user, service, item, f"{user}:{n}")
    store.write_items(cat.finish(), out)
    store.write_events(events.finish(), out, 1)
    return out


def _shop_items() -> list[dict]:
    """24 items of one service: two departments (under a common root), four leaves, brands,
    prices; the last item has neither brand nor price."""
    rows = []
    leaves = [("Face", "Creams"), ("Face", "Serums"), ("Hair", "Shampoos"), ("Hair", "Conditioners")]
    brands = ["Acme", "Borealis", "Cumulus"]
    for i in range(24):
        dept, leaf = leaves[i % 4]
        rows.append(
            {
                "service": "shop",
                "item_id": f"s{i:02d}",
                "title": f"{brands[i % 3]} hydrating {leaf.lower()} {'argan' if i % 2 else 'jojoba'} {i + 1} oz",
                "categories": ["Beauty", dept, leaf],
                "brand": brands[i % 3],
                "price": float(2 + 3 * i),
            }
        )
    rows[-1].update(brand=None, price=None)
    return rows


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hand-made histories over the shop catalogue (two users, one with the item lacking metadata)."""
    out = tmp_path_factory.mktemp("shop")
    histories = {
        ("u1", "shop"): ["s00", "s04", "s01", "s05", "s08", "s02", "s06"],
        ("u2", "shop"): ["s03", "s07", "s11", "s23", "s19", "s15"],
        ("u3", "shop"): ["s09", "s13"],
    }
    return _write(out, _shop_items(), histories)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small synthetic data set and its critiques."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=300, items_per_service=600, users_per_shard=150))
    synthetic.write(cfg, root / "data")
    stats = build_critiques(root / "data", root / "critiques", SYNTHETIC)
    return root, stats


def _rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


# -- attributes -----------------------------------------------------------------------------------


def test_price_bands_by_hand() -> None:
    """Prices 1..6, three bands: cut points at the 1/3 and 2/3 quantiles (linear: 1 + 5/3 = 2.667
    and 1 + 10/3 = 4.333), so 1, 2 -> 0; 3, 4 -> 1; 5, 6 -> 2. A leaf with fewer priced items
    than ``min_items`` takes its parent's cut points; a price on a cut point is in the lower band."""
    bands, cuts = price_bands([1, 2, 3, 4, 5, 6], [("a",)] * 6, num_bands=3, min_items=3)
    assert bands == [0, 0, 1, 1, 2, 2]
    assert cuts[("a",)] == pytest.approx([8 / 3, 13 / 3])
    # leaf x: 10, 20, 30 -> cuts 16.67, 23.33. Leaf y has 2 priced items < 3, so its group is ("d",):
    # 10, 20, 20, 30, 40 -> the 1/3 quantile at rank 4/3 is 20, the 2/3 one at rank 8/3 is
    # 20 + 2/3 * (30 - 20) = 26.67; y's 40 is above both (band 2), its 20 above neither (band 0)
    paths = [("d", "x"), ("d", "x"), ("d", "x"), ("d", "y"), ("d", "y"), ("d", "y")]
    bands, cuts = price_bands([10.0, 20.0, 30.0, 40.0, None, 20.0], paths, num_bands=3, min_items=3)
    assert cuts[("d", "x")] == pytest.approx([10 + 20 / 3, 10 + 40 / 3])
    assert cuts[("d",)] == pytest.approx([20.0, 20 + 20 / 3])
    assert bands == [0, 1, 2, 2, None, 0]


def test_price_critique_follows_band_and_price() -> None:
    """Cheaper / pricier only when the band and the price move the same way: an item in a cheap
    leaf's top band is not "pricier" than a dear leaf's bottom-band item that costs more."""
    items = [
        {"service": "s", "item_id": f"x{i}", "title": f"x{i}", "categories": ["R", "D", "X"], "price": p}
        for i, p in enumerate([10.0, 20.0, 30.0])
    ] + [
        {"service": "s", "item_id": f"y{i}", "title": f"y{i}", "categories": ["R", "D", "Y"], "price": p}
        for i, p in enumerate([1.0, 2.0, 3.0])
    ]
    a = service_attributes(pa.Table.from_pylist(items), "s", num_bands=3, min_band_items=3)
    assert [a.band[a.row[i]] for i in ("x0", "x2", "y0", "y2")] == [0, 2, 0, 2]
    cfg, unavailable = CritiqueConfig(), Counter()
    kinds = {c.type: c.clause for c in changes(a, a.row["x2"], a.row["x0"], cfg, unavailable)}
    assert kinds["price"] == "cheaper"
    kinds = {c.type: c.clause for c in changes(a, a.row["x0"], a.row["x2"], cfg, unavailable)}
    assert kinds["price"] == "pricier"
    # y2 (3.0, band 2) -> x0 (10.0, band 0): the band falls while the price rises
    assert "price" not in {c.type for c in changes(a, a.row["y2"], a.row["x0"], cfg, unavailable)}
    assert unavailable["price:band_disagrees_with_price"] == 1


def test_size_pack_and_colour_parsing() -> None:
    assert parse_size("Lotion SPF 15, 4.50-Fluid Ounce") == Size("amount", 4.5)
    assert parse_size("Serum 30 ml").value == pytest.approx(30 / 29.5735)
    assert parse_size("Oat milk 1L").value > parse_size("Oat flakes 500g").value
    assert parse_size("Wipes 30 Count (Pack of 3)") == Size("count", 30)
    assert parse_size("Chef knife compact") == Size("word", 1) and parse_size("Tent family size").value == 4
    assert parse_size("Brush") is None
    assert (parse_pack("Cloths (Pack of 3)"), parse_pack("Cola 6-pack"), parse_pack("set of 2")) == (3, 6, 2)
    assert parse_pack("Shampoo 12 oz") is None
    assert (parse_colour("Nail Polish, Light Gray"), parse_colour("Shampoo")) == ("grey", None)


def test_terms_leave_out_brands_digits_rare_and_common_words() -> None:
    """Terms: no brand word (here, "zenith" only ever comes with the Zenith brand), no token with a
    digit, nothing rarer than min_term_df titles, nothing in more than max_term_share of them."""
    items = []
    for i in range(40):
        brand = ["Zenith Labs", "Other Co", "Third"][i % 3]
        word = ["argan", "jojoba", "keratin", "biotin"][i % 4]
        tail = "rareword" if i % 5 == 0 else f"unique{i}"
        title = f"N{i} {'Zenith ' if i % 3 == 0 else ''}{word} shampoo X{i}00 {tail}"  # N{i}: no word leads
        items.append({"service": "s", "item_id": f"i{i}", "title": title, "brand": brand, "categories": []})
    a = service_attributes(pa.Table.from_pylist(items), "s", min_term_df=5, max_term_share=0.5)
    allowed = a.terms_from.allowed
    assert {"argan", "jojoba", "keratin", "biotin"} <= allowed
    assert "zenith" not in allowed and "zenith" in a.terms_from.brand_words
    assert "shampoo" not in allowed  # in every title: not distinctive
    assert "rareword" in allowed  # in 8 titles
    assert not any(ch.isdigit() for t in allowed for ch in t)
    assert a.terms_from.excluded["digit"] >= 40 and a.terms_from.excluded["common"] >= 1


def test_leading_words_are_brand_words_only_without_brands() -> None:
    """Keywords without a brand field start with the brand ("coleman lantern"): a word that opens
    most of its texts is a brand word, and so is one that mostly follows such a word. With a brand
    on every item the same titles keep those words."""
    texts = [f"coleman {w} lantern" for w in ("led", "gas", "mini")] + [
        f"{b} {w}" for b in ("sturdy", "ozark") for w in ("camping lantern", "tent stakes", "lantern hook")
    ]
    items = [{"service": "s", "item_id": f"i{i}", "text": t} for i, t in enumerate(texts)]
    a = service_attributes(pa.Table.from_pylist(items), "s", min_term_df=2, max_term_share=1.0)
    assert {"coleman", "sturdy", "ozark"} <= a.terms_from.brand_words
    assert "lantern" not in a.terms_from.brand_words and "lantern" in a.terms_from.allowed
    branded = [dict(row, brand="Acme") for row in items]
    b = service_attributes(
        pa.Table.from_pylist(branded), "s", min_term_df=2, max_term_share=1.0, brand_share=1.1
    )
    assert not b.terms_from.brand_words & {"coleman", "sturdy", "ozark"}


# -- the leakage check ------------------------------------------------------------------------------


def test_bm25_ranks_and_ties() -> None:
    """A query that matches only one document puts it first; one that matches nothing leaves the
    target tied with every document: top-1 is 1/N in expectation, not a hit."""
    bm25 = BM25(["red apple", "green apple", "banana split", None])
    assert np.argmax(bm25.scores("a red one")) == 0
    rates = bm25.hit_rates(["a red one", "zzz", "apple"], [0, 2, 1], ks=(1, 2))
    assert rates[0].tolist() == [1.0, 1.0]
    assert rates[1].tolist() == pytest.approx([1 / 4, 2 / 4])
    assert rates[2].tolist() == pytest.approx([0.5, 1.0])  # docs 0 and 1 tie on "apple"


def test_mentions_finds_titles_and_ids_as_whole_words() -> None:
    assert mentions("Do you have the ACME Super-Cream, 2oz?", "Acme super cream 2 oz.", "x1") is False
    assert mentions("Do you have the ACME Super-Cream 2 oz?", "Acme super cream 2 oz.", "x1") is True
    assert mentions("what about B00ABC please", None, "B00ABC") is True
    assert mentions("what about B00ABCD please", None, "B00ABC") is False


def _independent_leak(text: str, title: str | None, item_id: str) -> bool:
    """The title (lower case, runs of non-letters as one space) or the id inside the text."""

    def norm(s: str) -> str:
        return " " + re.sub(r"[^a-z0-9]+", " ", s.lower()).strip() + " "

    return bool(title and norm(title) in norm(text)) or item_id.lower() in text.lower()


def test_no_critique_holds_its_target(synthetic_run: tuple[Path, dict], shop: Path, tmp_path: Path) -> None:
    root, _ = synthetic_run
    build_critiques(shop, tmp_path / "shop", CritiqueConfig(min_matching_items=1))
    for out, data in ((root / "critiques", root / "data"), (tmp_path / "shop", shop)):
        items = {(r["service"], r["item_id"]): r for r in store.load_table(data, store.ITEMS_DIR).to_pylist()}
        rows = [r for s in SPLITS for r in _rows(out, s)]
        assert rows
        for r in rows:
            target = items[r["service"], r["target_item"]]
            assert not _independent_leak(r["text"], target["title"], r["target_item"]), r


def test_a_critique_that_would_hold_its_target_is_dropped(tmp_path: Path) -> None:
    """An item whose whole title is its brand: naming the brand would name the title, so that
    critique is dropped (``mentions_target``), never written."""
    items = [
        {
            "service": "s",
            "item_id": "p",
            "title": "Plain soap bar",
            "categories": ["D", "Soap"],
            "brand": "Old",
        },
        {"service": "s", "item_id": "t", "title": "Lumina", "categories": ["D", "Soap"], "brand": "Lumina"},
    ]
    items += [
        {
            "service": "s",
            "item_id": f"f{i}",
            "title": f"Filler {i}",
            "categories": ["D", "Soap"],
            "brand": "Lumina",
        }
        for i in range(6)
    ]
    data = _write(tmp_path / "data", items, {("u", "s"): ["p", "t", "p", "t"]})
    stats = build_critiques(data, tmp_path / "critiques", CritiqueConfig(max_types=1, min_matching_items=1))
    # p -> t (train) and p -> t (test): the brand is the only change, and it is t's title
    assert stats["pairs"]["train"]["s"]["skipped:mentions_target"] == 1
    assert stats["pairs"]["test"]["s"]["skipped:mentions_target"] == 1
    rows = [r for s in SPLITS for r in _rows(tmp_path / "critiques", s)]
    assert [r["target_item"] for r in rows] == ["p"]  # t -> p (valid) names Lumina as the previous brand


def test_templates_cannot_format_a_title(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the listed placeholders may appear in a template; ``{title}`` or ``{item_id}`` fails."""
    wording.check_families()
    bad = dict(wording.CRITIQUE_FAMILIES["prefer"].clauses, brand=("I want {title} by {brand}.",))
    families = dict(wording.CRITIQUE_FAMILIES, prefer=wording.CritiqueFamily(clauses=bad))
    monkeypatch.setattr(wording, "CRITIQUE_FAMILIES", families)
    with pytest.raises(ValueError, match="title"):
        wording.check_families()


def test_what_a_critique_names_fits_enough_items(synthetic_run: tuple[Path, dict]) -> None:
    """The leakage guard, checked from the catalogue: the items with the target's leaf, brand,
    colour and every named term, whichever the row names, number at least min_matching_items."""
    root, _ = synthetic_run
    items = store.load_table(root / "data", store.ITEMS_DIR).to_pylist()
    by_id = {(r["service"], r["item_id"]): r for r in items}
    checked = 0
    for r in _rows(root / "critiques", "test") + _rows(root / "critiques", "train")[:2000]:
        target = by_id[r["service"], r["target_item"]]
        fits = [i for i in items if i["service"] == r["service"]]
        if "category" in r["types"]:
            fits = [i for i in fits if i["categories"][-1].lower() == target["categories"][-1].lower()]
        if "brand" in r["types"]:
            fits = [i for i in fits if i["brand"].lower() == target["brand"].lower()]
        for term in r["terms"]:
            fits = [i for i in fits if term in re.findall(r"[a-z0-9]+", i["title"].lower())]
        if "colour" in r["types"]:
            colour = parse_colour(target["title"])
            fits = [i for i in fits if parse_colour(i["title"]) == colour]
        assert len(fits) >= SYNTHETIC.min_matching_items, r
        assert len(fits) == r["matching_items"], r
        checked += 1
    assert checked > 100


def test_retrieval_leakage_is_reported_and_small(synthetic_run: tuple[Path, dict]) -> None:
    root, stats = synthetic_run
    test = stats["leakage"]["test"]["all"]
    assert test["n"] == stats["rows"]["test"]
    assert test["critique_top1"] < 0.1 and test["critique_top10"] < 0.5
    assert set(stats["leakage"]["test_by"]) >= {"held_out", "seen"}
    # recomputed from the written rows
    attrs_rows = _rows(root / "critiques", "test")
    from moe_rec.data.critiques import load_attributes

    _, _, _, attrs = load_attributes(root / "data", SYNTHETIC)
    assert retrieval_leakage(attrs_rows, attrs)["all"] == test


# -- splits, families, determinism ---------------------------------------------------------------------


def test_held_out_families_never_in_train_or_valid(synthetic_run: tuple[Path, dict]) -> None:
    root, stats = synthetic_run
    held = set(SYNTHETIC.held_out_families)
    for split in ("train", "valid"):
        rows = _rows(root / "critiques", split)
        assert rows and not any(r["family"] in held or r["held_out"] for r in rows)
    test = _rows(root / "critiques", "test")
    assert {r["family"] for r in test} == set(wording.CRITIQUE_FAMILIES)
    assert all(r["held_out"] == (r["family"] in held) for r in test)
    share = sum(r["held_out"] for r in test) / len(test)
    assert 0.35 < share < 0.65  # test_held_out_share 0.5
    assert stats["held_out_rows"] == {"train": 0, "valid": 0, "test": sum(r["held_out"] for r in test)}


def test_each_split_uses_only_its_own_pairs(synthetic_run: tuple[Path, dict]) -> None:
    """Against the events: a train row's target and previous event are both training events, a
    valid row's target is the validation event and a test row's the last event, the previous
    item being the event just before it in the same history."""
    root, _ = synthetic_run
    events = store.load_table(root / "data").to_pylist()
    history: dict[tuple[str, str], list[dict]] = {}
    for e in sorted(events, key=lambda e: (e["user"], e["service"], e["position"])):
        history.setdefault((e["user"], e["service"]), []).append(e)
    for split in SPLITS:
        for r in _rows(root / "critiques", split):
            h = history[r["user"], r["service"]]
            target, prev = h[r["position"]], h[r["position"] - 1]
            assert (target["item_id"], prev["item_id"]) == (r["target_item"], r["prev_item"])
            assert target["split"] == split == r["split"]
            if split == "train":
                assert prev["split"] == "train"
            if split == "test":
                assert r["position"] == len(h) - 1


def test_same_seed_same_files_other_seed_other_words(
    synthetic_run: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = synthetic_run
    build_critiques(root / "data", tmp_path / "again", SYNTHETIC)
    build_critiques(root / "data", tmp_path / "seed1", CritiqueConfig(min_matching_items=10, seed=1))
    for split in SPLITS:
        first = pq.read_table(root / "critiques" / f"{split}.parquet")
        assert pq.read_table(tmp_path / "again" / f"{split}.parquet").equals(first)
        other = pq.read_table(tmp_path / "seed1" / f"{split}.parquet")
        assert other.column("text").to_pylist() != first.column("text").to_pylist()
    again = json.loads((tmp_path / "again" / "stats.json").read_text())
    assert again["rows"] == json.loads((root / "critiques" / "stats.json").read_text())["rows"]


def test_synthetic_critiques_use_every_attribute_it_has(synthetic_run: tuple[Path, dict]) -> None:
    """The synthetic catalogue has categories, brands, prices, terms, sizes and packs."""
    _, stats = synthetic_run
    assert set(stats["type_shares"]["train"]) >= {"category", "brand", "price", "terms", "size", "pack"}
    assert stats["similarity"]["grocery"]["by"] == "categories"
    assert load_rows(synthetic_run[0] / "critiques", "train").num_rows == stats["rows"]["train"]


# -- missing metadata and similarity -------------------------------------------------------------------


def test_missing_brand_and_price_skip_those_types(shop: Path, tmp_path: Path) -> None:
    """s23 has neither brand nor price: a pair into it names neither, counted, and nothing fails."""
    stats = build_critiques(shop, tmp_path / "c", CritiqueConfig(min_matching_items=1, max_types=7))
    rows = [r for s in SPLITS for r in _rows(tmp_path / "c", s)]
    into = [r for r in rows if r["target_item"] == "s23"]
    assert into and all("brand" not in r["types"] and "price" not in r["types"] for r in into)
    assert stats["unavailable"]["brand:missing"] >= 1 and stats["unavailable"]["price:missing"] >= 1
    # u1 s01 -> s05 (both Serums-or-Creams under Face): similar; s08 -> s02 crosses Face -> Hair
    skipped = Counter()
    for split in SPLITS:
        for c in stats["pairs"][split].values():
            skipped.update({k: v for k, v in c.items() if k.startswith("skipped:")})
    assert skipped["skipped:not_similar"] >= 1


def test_keyword_only_items_are_compared_by_embedding(tmp_path: Path) -> None:
    """Without categories, pairs are similar when their cosine reaches the quantile of random
    pairs'; without an encoder they are skipped (``no_similarity_signal``)."""
    kinds, adjectives = ["tent", "stove", "lamp"], ["lightweight", "waterproof", "folding", "insulated"]
    items = [
        {"service": "kw", "item_id": f"k{i}", "text": f"n{i} {adjectives[i % 4]} camping {kinds[i % 3]}"}
        for i in range(12)
    ]
    data = _write(
        tmp_path / "data",
        items,
        {("u", "kw"): ["k0", "k3", "k1", "k6", "k9"], ("v", "kw"): ["k2", "k5", "k8"]},
    )

    def embed(rows: pa.Table) -> np.ndarray:  # one axis per item kind: same kind -> cosine 1, else 0
        kinds = [int(i[1:]) % 3 for i in rows.column("item_id").to_pylist()]
        return np.eye(3, dtype=np.float32)[kinds]

    # training items k0 k3 k1 k2: a random pair is of one kind with p = 3/8, so the 0.9 quantile is 1
    cfg = CritiqueConfig(min_matching_items=1, min_term_df=2, max_term_share=0.5, embedding_quantile=0.9)
    stats = build_critiques(data, tmp_path / "c", cfg, embed)
    assert stats["similarity"]["kw"]["by"] == "embedding"
    kept = [r for s in SPLITS for r in _rows(tmp_path / "c", s)]
    assert kept and all(int(r["prev_item"][1:]) % 3 == int(r["target_item"][1:]) % 3 for r in kept)
    assert all(r["similar_by"] == "embedding" and r["similarity"] == pytest.approx(1.0) for r in kept)
    stats = build_critiques(data, tmp_path / "none", CritiqueConfig())
    assert stats["rows"] == {"train": 0, "valid": 0, "test": 0}
    assert (
        stats["pairs"]["train"]["kw"]["skipped:no_similarity_signal"]
        == stats["pairs"]["train"]["kw"]["considered"]
    )


def test_critique_of_a_repeat_is_skipped(shop: Path) -> None:
    from moe_rec.data.critiques import Similarity, load_attributes

    _, _, _, attrs = load_attributes(shop, CritiqueConfig())
    a = attrs["shop"]
    tally = {"unavailable": Counter(), "guard_dropped": Counter()}
    assert (
        critique_pair(a, Similarity(a, 1), "u", 1, "train", "s00", "s00", CritiqueConfig(), tally)
        == "same_item"
    )


# -- config ---------------------------------------------------------------------------------------------


def test_critiques_config_is_validated(tmp_path: Path) -> None:
    assert load_config(ExperimentConfig).critiques.enabled is False
    cfg = load_config(
        ExperimentConfig, overrides=["critiques.held_out_families=[terse]", "critiques.max_types=2"]
    )
    assert cfg.critiques.held_out_families == ["terse"] and cfg.critiques.max_types == 2
    for override, message in (
        ("critiques.held_out_families=[nope]", "unknown famil"),
        (f"critiques.held_out_families={sorted(wording.CRITIQUE_FAMILIES)}", "every family"),
        ("critiques.price_bands=9", "price_bands"),
        ("critiques.min_term_dff=3", "did you mean 'critiques.min_term_df'"),
        (
            "critiques.narratives.held_out_families=[because, since, taste_first, what_first, bullets, friend]",
            "every",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(ExperimentConfig, overrides=[override])
