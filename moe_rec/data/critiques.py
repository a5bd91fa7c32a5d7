"""Critiques built from item metadata, the way REGEN (arXiv 2503.11924) built its own.

A critique is what a user says to steer from the item in front of them (the *previous* item of
their history) to the one they went for next (the *target*): "Not a fan of Revlon. Anything by
Maybelline? Anything cheaper?". REGEN had an LLM write them; nothing here calls a model, so the
changes are read off the catalogue (:mod:`moe_rec.data.item_attributes`) and worded by templates
(:mod:`moe_rec.data.wording`).

**Pairs.** Every two adjacent events of a user's history in one service are a pair. Train rows
come from pairs whose target is a ``train`` event (so both events are training events); the
``valid`` row steers from the last training event to the validation event, the ``test`` row from
the second-to-last event to the held-out last one. Only similar pairs get a critique: pairs whose
items share ``min_shared_levels`` category levels below the service's common root (Beauty: the
same department), or, for items without categories (Amazon Sports and Toys have only keywords),
whose text embeddings are closer than ``embedding_quantile`` of random pairs of the service.

**Changes.** For a similar pair the builder lists what changes, one *type* each, skipping (and
counting) what the data lack: ``category`` (the leaf differs: "something in lip gloss"),
``brand`` (named: "by Maybelline", with the previous brand when known), ``price`` (the price band
moved, the same way as the price: "cheaper" / "pricier"), ``terms`` (up to ``max_terms``
distinctive words of the target's title that the previous title lacks), ``size`` (amounts differ
by ``size_ratio``), ``pack`` and ``colour``. It then draws 1..``max_types`` of them.

**Leakage guard.** A critique never holds its target's title or id (checked, and dropped and
counted if it did: ``mentions_target``), and what it names must not single the target out: the
items that fit all it names (leaf category, brand, terms, colour) must number at least
``min_matching_items``, else the most specific part is dropped in turn (terms, colour, brand,
category), and when nothing is left a non-naming change (price, size, pack) stands in or the pair
is skipped (``too_specific``). Terms must appear in ``min_term_df`` titles. How well this works is
measured, not assumed: :func:`moe_rec.data.leakage.retrieval_leakage` retrieves with the critique
alone and reports how often the target comes first (in ``stats.json``).

**Wording.** Each row draws a family (train and valid: the seen ones; test: a held-out one with
``test_held_out_share``), then a phrasing per change, an opener and a closer. Every draw comes
from a random generator seeded by ``(seed, service, user, position)``, so a row does not depend
on any other and the same config gives the same files.

Writes ``<run_dir>/critiques/{train,valid,test}.parquet`` (:data:`CRITIQUE_SCHEMA`) and
``stats.json``: pairs considered / kept / skipped by reason, per split and service; the types,
clauses and families of the kept rows; per type, why it was unavailable; the guard's drops; the
catalogue's attribute coverage and term filter; the leakage measures.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from moe_rec.config import to_dict
from moe_rec.console import progress
from moe_rec.data import store
from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.item_attributes import ItemAttributes, brand_key, service_attributes
from moe_rec.data.leakage import BM25, hit_rates, mentions, retrieval_leakage
from moe_rec.data.schema import SPLITS, DataError
from moe_rec.data.wording import CRITIQUE_FAMILIES, CritiqueFamily

CRITIQUES_DIR = "critiques"
STATS_FILE = "stats.json"
TYPES = ("category", "brand", "price", "terms", "size", "pack", "colour")
NAMING_DROP_ORDER = ("terms", "colour", "brand", "category")  # types that name a value of the target
Embed = Callable[[pa.Table], np.ndarray]  # catalogue rows -> (N, D) vectors of their encoder text

CRITIQUE_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string()),
        pa.field("service", pa.string()),
        pa.field("position", pa.int32()),  # the target's position in the user's service history
        pa.field("split", pa.string()),  # the target event's split
        pa.field("prev_item", pa.string()),  # the item at position - 1
        pa.field("target_item", pa.string()),
        pa.field("text", pa.string()),
        pa.field("types", pa.list_(pa.string())),  # category | brand | price | terms | size | pack | colour
        pa.field("clauses", pa.list_(pa.string())),  # the wording keys: cheaper, brand_only, bigger_pack, ...
        pa.field("terms", pa.list_(pa.string())),  # the distinctive terms it names (empty: none)
        pa.field("family", pa.string()),
        pa.field("held_out", pa.bool_()),  # the family is held out of training
        pa.field("similar_by", pa.string()),  # categories | embedding
        pa.field("similarity", pa.float32()),  # shared category levels, or the cosine
        pa.field("matching_items", pa.int32()),  # items of the service that fit everything the text names
    ]
)


# -- histories and pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    """One user's events in one service, in position order."""

    user: str
    service: str
    items: list[str]
    splits: list[str]


def histories(events: pa.Table, services: list[str] | None = None) -> Iterator[History]:
    """Every ``(user, service)`` history of a prepared events table, sorted by user and service."""
    table = events.select(["user", "service", "item_id", "position", "split"])
    if services is not None:
        table = table.filter(pc.is_in(table.column("service"), pa.array(services, pa.string())))
    table = table.sort_by([("user", "ascending"), ("service", "ascending"), ("position", "ascending")])
    users, svc = table.column("user").to_pylist(), table.column("service").to_pylist()
    items, splits = table.column("item_id").to_pylist(), table.column("split").to_pylist()
    start = 0
    for i in range(1, len(users) + 1):
        if i == len(users) or users[i] != users[start] or svc[i] != svc[start]:
            yield History(users[start], svc[start], items[start:i], splits[start:i])
            start = i


def row_rng(seed: int, *key: object) -> random.Random:
    """A generator seeded by ``(seed, *key)`` (a string seed: the same in every process)."""
    return random.Random("|".join(map(str, (seed, *key))))


def count_histories(events: pa.Table, services: list[str] | None) -> int:
    table = events if services is None else events.filter(pc.is_in(events["service"], pa.array(services)))
    return table.group_by(["user", "service"]).aggregate([]).num_rows


# -- similarity ---------------------------------------------------------------------------------


def shared_levels(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def service_vectors(items: pa.Table, service: str, embed: Embed) -> np.ndarray:
    """(N, D) unit vectors of the service's items (in table order)."""
    rows = items.filter(pc.equal(items.column("service"), service))
    vectors = np.asarray(embed(rows), dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def embedding_threshold(
    vectors: np.ndarray, prev_rows: np.ndarray, target_rows: np.ndarray, quantile: float, n: int, seed: int
) -> float:
    """The ``quantile`` of the cosine between random pairs: a previous item of one pair and the
    target of another (so popular items weigh as they do in the histories)."""
    rng = np.random.default_rng(seed)
    a = prev_rows[rng.integers(len(prev_rows), size=n)]
    b = target_rows[rng.integers(len(target_rows), size=n)]
    return float(np.quantile((vectors[a] * vectors[b]).sum(axis=1), quantile))


@dataclass
class Similarity:
    """Whether two items of one service are similar enough for a critique."""

    attrs: ItemAttributes
    min_shared_levels: int
    vectors: np.ndarray | None = None  # (N, D) unit vectors, for items without categories
    threshold: float | None = None

    def __call__(self, p: int, t: int) -> tuple[str, float, bool]:
        """``(by, value, similar)``: by ``categories`` (shared levels) or ``embedding`` (cosine);
        ``none`` when neither is available."""
        a = self.attrs
        if a.path[p] and a.path[t]:
            k = shared_levels(a.path[p], a.path[t])
            return "categories", float(k), k >= self.min_shared_levels
        if self.vectors is None or self.threshold is None:
            return "none", 0.0, False
        cos = float(self.vectors[p] @ self.vectors[t])
        return "embedding", cos, cos >= self.threshold


# -- what changes -------------------------------------------------------------------------------


@dataclass
class Change:
    """One change a critique may name: its type, the wording key and the placeholder values."""

    type: str
    clause: str
    values: dict[str, Any]


def changes(a: ItemAttributes, p: int, t: int, cfg: CritiqueConfig, unavailable: Counter) -> list[Change]:
    """What changes from item ``p`` to item ``t``, in :data:`TYPES` order; a type that cannot be
    named is counted in ``unavailable`` as ``type:reason``."""
    out: list[Change] = []
    # category: the leaf, by name
    if not (a.path[p] and a.path[t]):
        unavailable["category:missing"] += 1
    elif a.leaf(t).lower() == a.leaf(p).lower():
        unavailable["category:same"] += 1
    else:
        names = {"category": a.leaf(t).lower(), "prev_category": a.leaf(p).lower()}
        out.append(Change("category", "category", names))
    # brand
    bt, bp = a.brand[t], a.brand[p]
    if not bt:
        unavailable["brand:missing"] += 1
    elif bp and brand_key(bp) == brand_key(bt):
        unavailable["brand:same"] += 1
    else:
        out.append(Change("brand", "brand" if bp else "brand_only", {"brand": bt, "prev_brand": bp}))
    # price: the band moved, and the price moved the same way
    if a.band[t] is None or a.band[p] is None:
        unavailable["price:missing"] += 1
    elif a.band[t] == a.band[p]:
        unavailable["price:same"] += 1
    elif (a.band[t] < a.band[p]) != (a.price[t] < a.price[p]) or a.price[t] == a.price[p]:
        unavailable["price:band_disagrees_with_price"] += 1
    else:
        clause = "cheaper" if a.band[t] < a.band[p] else "pricier"
        out.append(Change("price", clause, {"band": a.band_name(a.band[t])}))
    # terms: the target's distinctive words the previous title lacks, not restating a category or brand
    taken = a.tokens[p] | a.name_words[p] | a.name_words[t]
    new = [w for w in a.terms[t] if w not in taken]
    if not a.terms[t]:
        unavailable["terms:missing"] += 1
    elif not new:
        unavailable["terms:same"] += 1
    else:
        out.append(Change("terms", "terms", {"terms": tuple(new[: cfg.max_terms])}))
    # size: the same kind of size, different enough
    st, sp = a.size[t], a.size[p]
    if st is None or sp is None or st.kind != sp.kind:
        unavailable["size:missing"] += 1
    else:
        ratio = cfg.size_ratio if st.kind != "word" else 1.0
        if st.value > sp.value * ratio:
            out.append(Change("size", "bigger", {}))
        elif st.value * ratio < sp.value:
            out.append(Change("size", "smaller", {}))
        else:
            unavailable["size:same"] += 1
    # pack: an unmentioned pack is one
    if a.pack[t] is None and a.pack[p] is None:
        unavailable["pack:missing"] += 1
    elif (a.pack[t] or 1) == (a.pack[p] or 1):
        unavailable["pack:same"] += 1
    else:
        bigger = (a.pack[t] or 1) > (a.pack[p] or 1)
        out.append(Change("pack", "bigger_pack" if bigger else "smaller_pack", {}))
    # colour
    if a.colour[t] is None:
        unavailable["colour:missing"] += 1
    elif a.colour[t] == a.colour[p]:
        unavailable["colour:same"] += 1
    else:
        out.append(Change("colour", "colour", {"colour": a.colour[t]}))
    return out


def matching_items(a: ItemAttributes, t: int, chosen: list[Change]) -> int:
    """How many of the service's items fit everything ``chosen`` names about item ``t``."""
    sets: list[set[int]] = []
    for c in chosen:
        if c.type == "category":
            sets.append(a.by_leaf[a.leaf(t).lower()])
        elif c.type == "brand":
            sets.append(a.by_brand[brand_key(a.brand[t])])
        elif c.type == "terms":
            sets.extend(a.by_term[w] for w in c.values["terms"])
        elif c.type == "colour":
            sets.append(a.by_colour[a.colour[t]])
    if not sets:
        return len(a)
    sets.sort(key=len)
    fit = set(sets[0])
    for s in sets[1:]:
        fit &= s
    return len(fit)


def guard(
    a: ItemAttributes, t: int, chosen: list[Change], available: list[Change], min_items: int, dropped: Counter
) -> tuple[list[Change], int]:
    """Drop what makes ``chosen`` fit fewer than ``min_items`` items (see the module docstring);
    returns what is left (possibly nothing) and how many items it fits."""
    chosen = list(chosen)
    fit = matching_items(a, t, chosen)
    for kind in NAMING_DROP_ORDER:
        if fit >= min_items:
            break
        if any(c.type == kind for c in chosen):
            chosen = [c for c in chosen if c.type != kind]
            dropped[kind] += 1
            fit = matching_items(a, t, chosen)
    if not chosen:
        spare = [c for c in available if c.type not in NAMING_DROP_ORDER]
        if spare:
            chosen = [spare[0]]
            fit = len(a)
    return chosen, fit


# -- wording ------------------------------------------------------------------------------------


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _values(change: Change) -> dict[str, str]:
    return {
        k: " and ".join(v) if isinstance(v, tuple) else v for k, v in change.values.items() if v is not None
    }


def word(family: CritiqueFamily, chosen: list[Change], rng: random.Random) -> str:
    """The critique's text: an opener, one sentence per change, a closer."""
    sentences = [_capital(rng.choice(family.clauses[c.clause]).format(**_values(c))) for c in chosen]
    opener, closer = rng.choice(family.openers), rng.choice(family.closers)
    return " ".join(s for s in (opener, *sentences) if s) + closer


def pick_family(split: str, families: dict, held_out: list[str], share: float, rng: random.Random) -> str:
    """A seen family for train and valid; for test a held-out one with probability ``share``."""
    held = [f for f in families if f in held_out]
    seen = [f for f in families if f not in held_out]
    if split == "test" and held and rng.random() < share:
        return rng.choice(held)
    return rng.choice(seen)


# -- the build ----------------------------------------------------------------------------------


def load_attributes(
    data_dir: Path, cfg: CritiqueConfig, services: list[str] | None = None
) -> tuple[pa.Table, pa.Table, list[str], dict[str, ItemAttributes]]:
    """Events, items, the services to build for and their attributes."""
    events = store.load_table(data_dir, store.EVENTS_DIR)
    items = store.load_table(data_dir, store.ITEMS_DIR)
    present = sorted(set(events.column("service").to_pylist()))
    wanted = services if services is not None else (cfg.services or present)
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise DataError(f"critiques.services: {unknown} not in the prepared data (it has {present})")
    attrs = {
        s: service_attributes(
            items,
            s,
            num_bands=cfg.price_bands,
            min_band_items=cfg.min_band_items,
            min_term_df=cfg.min_term_df,
            max_term_share=cfg.max_term_share,
            brand_share=cfg.brand_share,
            leading_share=cfg.leading_share,
        )
        for s in wanted
    }
    return events, items, list(wanted), attrs


def similarities(
    events: pa.Table,
    items: pa.Table,
    attrs: dict[str, ItemAttributes],
    cfg: CritiqueConfig,
    embed: Embed | None,
) -> tuple[dict[str, Similarity], dict[str, Any]]:
    """A :class:`Similarity` per service; the embedding threshold is calibrated for a service whose
    items lack categories (when ``embed`` is given). Also returns what was decided, for stats."""
    out, info = {}, {}
    for s, a in attrs.items():
        sim = Similarity(a, cfg.min_shared_levels)
        uncategorised = sum(1 for p in a.path if not p)
        info[s] = {"by": "categories", "items_without_categories": uncategorised}
        if uncategorised and embed is not None:
            ev = events.filter(pc.equal(events.column("service"), s))
            ev = ev.filter(pc.equal(ev.column("split"), "train"))
            rows = np.array([a.row[i] for i in ev.column("item_id").to_pylist()], dtype=np.int64)
            sim.vectors = service_vectors(items, s, embed)
            sim.threshold = embedding_threshold(
                sim.vectors, rows, rows, cfg.embedding_quantile, cfg.calibration_pairs, cfg.seed
            )
            info[s] = {
                "by": "categories, else embedding" if uncategorised < len(a) else "embedding",
                "items_without_categories": uncategorised,
                "embedding_threshold": round(sim.threshold, 4),
                "embedding_quantile": cfg.embedding_quantile,
            }
        out[s] = sim
    return out, info


def critique_pair(
    a: ItemAttributes,
    sim: Similarity,
    user: str,
    position: int,
    split: str,
    prev: str,
    target: str,
    cfg: CritiqueConfig,
    tally: dict[str, Counter],
) -> dict[str, Any] | str:
    """One critique row, or the reason the pair has none."""
    if prev == target:
        return "same_item"
    p, t = a.row[prev], a.row[target]
    by, value, similar = sim(p, t)
    if by == "none":
        return "no_similarity_signal"
    if not similar:
        return "not_similar"
    available = changes(a, p, t, cfg, tally["unavailable"])
    if not available:
        return "no_change"
    rng = row_rng(cfg.seed, a.service, user, position)
    k = rng.randint(1, min(cfg.max_types, len(available)))
    picked = sorted(rng.sample(available, k), key=lambda c: TYPES.index(c.type))
    chosen, fit = guard(a, t, picked, available, cfg.min_matching_items, tally["guard_dropped"])
    if not chosen:
        return "too_specific"
    family = pick_family(split, CRITIQUE_FAMILIES, cfg.held_out_families, cfg.test_held_out_share, rng)
    text = word(CRITIQUE_FAMILIES[family], chosen, rng)
    if mentions(text, a.title[t], target):
        return "mentions_target"
    return {
        "user": user,
        "service": a.service,
        "position": position,
        "split": split,
        "prev_item": prev,
        "target_item": target,
        "text": text,
        "types": [c.type for c in chosen],
        "clauses": [c.clause for c in chosen],
        "terms": [w for c in chosen if c.type == "terms" for w in c.values["terms"]],
        "family": family,
        "held_out": family in cfg.held_out_families,
        "similar_by": by,
        "similarity": value,
        "matching_items": fit,
    }


def write_rows(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    """One Parquet file through ``datasets`` (an empty split is written with its schema)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    store.write_shard(table, path)


def load_rows(out_dir: Path, split: str) -> datasets.Dataset:
    """A split of ``<run_dir>/critiques`` or ``<run_dir>/narratives`` as a ``datasets.Dataset``."""
    path = Path(out_dir) / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"{path} not found; run `moe-rec critiques build` first")
    return datasets.Dataset(InMemoryTable(pq.read_table(path)))


def _shares(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / max(total, 1), 4) for k, v in counter.most_common()}


def build_critiques(
    data_dir: Path, out_dir: Path, cfg: CritiqueConfig, embed: Embed | None = None
) -> dict[str, Any]:
    """Write ``out_dir/{train,valid,test}.parquet`` and ``out_dir/stats.json``; returns the stats.

    Args:
        data_dir: a prepared data directory (``<run_dir>/data``).
        out_dir: where the critiques go (``<run_dir>/critiques``).
        cfg: the ``critiques:`` config.
        embed: catalogue rows -> their text embeddings (the CLI passes the SID encoder over
            :func:`moe_rec.sid.item_text.item_texts`), for services whose items lack categories
            (None: such pairs are skipped as ``no_similarity_signal``).
    """
    t0 = time.perf_counter()
    events, items, services, attrs = load_attributes(data_dir, cfg)
    sims, similarity_info = similarities(events, items, attrs, cfg, embed)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    pairs: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    tally: dict[str, Counter] = {"unavailable": Counter(), "guard_dropped": Counter()}
    with progress() as bar:
        task = bar.add_task("critiques", total=count_histories(events, services))
        for h in histories(events, services):
            a, sim = attrs[h.service], sims[h.service]
            for i in range(1, len(h.items)):
                split = h.splits[i]
                made = critique_pair(a, sim, h.user, i, split, h.items[i - 1], h.items[i], cfg, tally)
                counts = pairs[split][h.service]
                counts["considered"] += 1
                if isinstance(made, str):
                    counts[f"skipped:{made}"] += 1
                else:
                    counts["kept"] += 1
                    rows[split].append(made)
            bar.advance(task)
    out_dir = Path(out_dir)
    for split in SPLITS:
        write_rows(rows[split], CRITIQUE_SCHEMA, out_dir / f"{split}.parquet")
    stats: dict[str, Any] = {
        "rows": {s: len(rows[s]) for s in SPLITS},
        "pairs": {
            split: {svc: dict(sorted(c.items())) for svc, c in sorted(per.items())}
            for split, per in pairs.items()
        },
        "type_shares": {
            s: _shares(Counter(t for r in rows[s] for t in r["types"]), len(rows[s])) for s in SPLITS
        },
        "types_per_critique": {
            s: dict(sorted(Counter(len(r["types"]) for r in rows[s]).items())) for s in SPLITS
        },
        "clauses": {s: dict(Counter(c for r in rows[s] for c in r["clauses"]).most_common()) for s in SPLITS},
        "families": {s: dict(sorted(Counter(r["family"] for r in rows[s]).items())) for s in SPLITS},
        "held_out_families": list(cfg.held_out_families),
        "held_out_rows": {s: sum(r["held_out"] for r in rows[s]) for s in SPLITS},
        "unavailable": dict(sorted(tally["unavailable"].items())),
        "guard_dropped": dict(tally["guard_dropped"].most_common()),
        "similarity": similarity_info,
        "attributes": {
            s: {
                **a.coverage(),
                "term_filter": {"allowed": len(a.terms_from.allowed), **a.terms_from.excluded},
            }
            for s, a in attrs.items()
        },
    }
    stats["leakage"] = measure_leakage(rows, attrs, cfg)
    stats["config"] = json.loads(json.dumps(to_dict(cfg)))
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def measure_leakage(
    rows: dict[str, list[dict[str, Any]]], attrs: dict[str, ItemAttributes], cfg: CritiqueConfig
) -> dict[str, Any]:
    """:func:`~moe_rec.data.leakage.retrieval_leakage` of every test critique and of a seeded sample
    of ``leakage_sample`` train and valid ones; test also by family (seen / held out) and by
    whether the critique names terms."""
    index: dict[str, BM25] = {}
    out: dict[str, Any] = {}
    for split in SPLITS:
        chosen = rows[split]
        if split != "test" and len(chosen) > cfg.leakage_sample:
            chosen = random.Random(f"{cfg.seed}|leakage|{split}").sample(chosen, cfg.leakage_sample)
        if not chosen:
            continue
        rates = hit_rates(chosen, attrs, index)
        out[split] = retrieval_leakage(chosen, attrs, rates=rates)
        if split == "test":
            groups = {
                "held_out": [r["held_out"] for r in chosen],
                "seen": [not r["held_out"] for r in chosen],
                "with_terms": ["terms" in r["types"] for r in chosen],
                "without_terms": ["terms" not in r["types"] for r in chosen],
            }
            out["test_by"] = {}
            for name, keep in groups.items():
                mask = np.array(keep, dtype=bool)
                if mask.any():
                    sub = [r for r, k in zip(chosen, keep) if k]
                    part = {q: v[mask] for q, v in rates.items()}
                    out["test_by"][name] = retrieval_leakage(sub, attrs, rates=part)["all"]
    return out


def read_stats(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / STATS_FILE
    if not path.exists():
        raise DataError(f"no {STATS_FILE} in {out_dir}; run `moe-rec critiques build` first")
    return json.loads(path.read_text())
