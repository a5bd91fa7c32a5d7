"""Narratives: why an item suits a user, composed from its metadata and the user's history.

REGEN had an LLM write a narrative per user; here one is composed, for a target event, from three
parts (:mod:`moe_rec.data.wording` holds the templates):

* **what** the target is: its price band, leaf category, brand and up to ``max_terms`` distinctive
  terms ("a budget pick in lotions by Nivea, with shea and cocoa"), whatever the source has;
* **why**, given the history before it (the same service's earlier events): history items in the
  same leaf category ("you have bought 3 other things in lotions"), of the same brand, in the same
  department, or sharing a distinctive term; one of the kinds found is drawn, and ``none`` ("it is
  something new for you to try") when nothing is shared. History items are referred to only by
  category, brand, term and count, never by id or title;
* **taste**, one line from the history's most frequent leaf categories (two) and brand ("mostly
  lotions and shampoos, often from Nivea"), or its most frequent terms where there are no
  categories.

Targets: every training event with at least one event before it (``train_targets: all``; ``last``:
each history's last training event), the validation event and the test event; a target's history
is every event before it (a training target's is training events only). Families are drawn as for
critiques: train and valid from the seen ones, test from a held-out one with
``test_held_out_share``. Writes ``<run_dir>/narratives/{train,valid,test}.parquet``
(:data:`NARRATIVE_SCHEMA`) and ``stats.json``.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from moe_rec.config import to_dict
from moe_rec.console import progress
from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.critiques import (
    STATS_FILE,
    History,
    count_histories,
    histories,
    load_attributes,
    pick_family,
    row_rng,
    write_rows,
)
from moe_rec.data.item_attributes import ItemAttributes, brand_key
from moe_rec.data.leakage import mentions
from moe_rec.data.schema import SPLITS
from moe_rec.data.wording import NARRATIVE_FAMILIES, TASTE, WHY

NARRATIVES_DIR = "narratives"
WHY_ORDER = ("same_leaf", "same_brand", "same_department", "shared_terms")

NARRATIVE_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string()),
        pa.field("service", pa.string()),
        pa.field("position", pa.int32()),  # the target's position in the user's service history
        pa.field("split", pa.string()),
        pa.field("target_item", pa.string()),
        pa.field("text", pa.string()),
        pa.field("family", pa.string()),
        pa.field("held_out", pa.bool_()),
        pa.field("why", pa.string()),  # same_leaf | same_brand | same_department | shared_terms | none
        pa.field("parts", pa.list_(pa.string())),  # what the "what" names: price, category, brand, terms
        pa.field("history_len", pa.int32()),
    ]
)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def describe(a: ItemAttributes, t: int, noun: str, max_terms: int) -> tuple[str, list[str]]:
    """What item ``t`` is, as a noun phrase, and the parts it names (empty: nothing to say)."""
    parts, band = [], a.band_name(a.band[t])
    phrase = noun
    if band:
        phrase, parts = f"{band} {noun}", ["price"]
    if a.path[t]:
        phrase += f" in {a.leaf(t).lower()}"
        parts.append("category")
    if a.brand[t]:
        phrase += f" by {a.brand[t]}"
        parts.append("brand")
    terms = [w for w in a.terms[t] if w not in a.name_words[t]][:max_terms]
    if terms:
        phrase += f"{',' if parts else ''} with {_and(terms)}"
        parts.append("terms")
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}", parts


def why(a: ItemAttributes, t: int, history: list[int], rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One reason, drawn among the kinds the history supports: ``(kind, placeholder values)``."""
    found: dict[str, dict[str, Any]] = {}
    if a.path[t]:
        leaf, dept = a.leaf(t).lower(), a.department(t)
        n = sum(1 for h in history if a.path[h] and a.leaf(h).lower() == leaf)
        if n:
            found["same_leaf"] = {
                "things": "another thing" if n == 1 else f"{n} other things",
                "category": leaf,
            }
        n = sum(1 for h in history if a.path[h] and a.department(h) == dept)
        if n and "same_leaf" not in found:
            found["same_department"] = {"department": dept.lower()}
    if a.brand[t]:
        key = brand_key(a.brand[t])
        n = sum(1 for h in history if a.brand[h] and brand_key(a.brand[h]) == key)
        if n:
            found["same_brand"] = {"times": {1: "once", 2: "twice"}.get(n, f"{n} times"), "brand": a.brand[t]}
    seen = Counter(w for h in history for w in a.terms[h])
    shared = [w for w in a.terms[t] if seen[w] and w not in a.name_words[t]][:2]
    if shared:
        found["shared_terms"] = {"terms": _and(shared)}
    if not found:
        return "none", {}
    kind = rng.choice([k for k in WHY_ORDER if k in found])
    return kind, found[kind]


def taste(a: ItemAttributes, history: list[int]) -> tuple[str, dict[str, str]]:
    """The history in one line: its top two leaf categories and a frequent brand, else its top terms."""
    leaves = Counter(a.leaf(h).lower() for h in history if a.path[h])
    if leaves:
        top = [name for name, _ in leaves.most_common(2)]
        brands = Counter(a.brand[h] for h in history if a.brand[h])
        if brands:
            brand, n = brands.most_common(1)[0]
            if n >= 2 and n >= 0.3 * len(history):
                return "categories_brand", {"categories": _and(top), "brand": brand}
        return "categories", {"categories": _and(top)}
    terms = Counter(w for h in history for w in a.terms[h])
    if terms:
        return "terms", {"terms": _and([w for w, _ in terms.most_common(3)])}
    return "varied", {}


def narrate(a: ItemAttributes, h: History, i: int, cfg: CritiqueConfig) -> dict[str, Any] | str:
    """The narrative row for the event at position ``i`` of ``h``, or why there is none."""
    if i == 0:
        return "no_history"
    t = a.row[h.items[i]]
    history = [a.row[x] for x in h.items[:i]]
    rng = row_rng(cfg.seed, "narrative", h.service, h.user, i)
    held_out = cfg.narratives.held_out_families
    family = pick_family(h.splits[i], NARRATIVE_FAMILIES, held_out, cfg.test_held_out_share, rng)
    fam = NARRATIVE_FAMILIES[family]
    what, parts = describe(a, t, rng.choice(fam.nouns), cfg.narratives.max_terms)
    if not parts:
        return "nothing_to_say"
    kind, why_values = why(a, t, history, rng)
    taste_kind, taste_values = taste(a, history)
    text = rng.choice(fam.templates).format(
        what=what,
        why=rng.choice(WHY[kind]).format(**why_values),
        taste=rng.choice(TASTE[taste_kind]).format(**taste_values),
    )
    text = text[:1].upper() + text[1:]
    if mentions(text, a.title[t], h.items[i]):
        return "mentions_target"
    return {
        "user": h.user,
        "service": h.service,
        "position": i,
        "split": h.splits[i],
        "target_item": h.items[i],
        "text": text,
        "family": family,
        "held_out": family in cfg.narratives.held_out_families,
        "why": kind,
        "parts": parts,
        "history_len": i,
    }


def targets(h: History, train_targets: str) -> list[int]:
    """Positions of ``h`` that get a narrative: valid and test, and the training ones asked for."""
    train = [i for i, s in enumerate(h.splits) if s == "train" and i > 0]
    if train_targets == "last":
        train = train[-1:]
    return train + [i for i, s in enumerate(h.splits) if s != "train"]


def build_narratives(data_dir: Path, out_dir: Path, cfg: CritiqueConfig) -> dict[str, Any]:
    """Write ``out_dir/{train,valid,test}.parquet`` and ``out_dir/stats.json``; returns the stats."""
    t0 = time.perf_counter()
    events, _, services, attrs = load_attributes(data_dir, cfg)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    skipped: dict[str, Counter] = {s: Counter() for s in SPLITS}
    with progress() as bar:
        task = bar.add_task("narratives", total=count_histories(events, services))
        for h in histories(events, services):
            for i in targets(h, cfg.narratives.train_targets):
                made = narrate(attrs[h.service], h, i, cfg)
                if isinstance(made, str):
                    skipped[h.splits[i]][made] += 1
                else:
                    rows[h.splits[i]].append(made)
            bar.advance(task)
    out_dir = Path(out_dir)
    for split in SPLITS:
        write_rows(rows[split], NARRATIVE_SCHEMA, out_dir / f"{split}.parquet")
    stats = {
        "rows": {s: len(rows[s]) for s in SPLITS},
        "skipped": {s: dict(skipped[s].most_common()) for s in SPLITS},
        "families": {s: dict(sorted(Counter(r["family"] for r in rows[s]).items())) for s in SPLITS},
        "held_out_families": list(cfg.narratives.held_out_families),
        "held_out_rows": {s: sum(r["held_out"] for r in rows[s]) for s in SPLITS},
        "why": {s: dict(Counter(r["why"] for r in rows[s]).most_common()) for s in SPLITS},
        "parts": {
            s: {
                k: round(v / max(len(rows[s]), 1), 4)
                for k, v in Counter(p for r in rows[s] for p in r["parts"]).most_common()
            }
            for s in SPLITS
        },
        "config": json.loads(json.dumps(to_dict(cfg))),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return stats
