"""Does a critique steer the ranking? Critique requests (:mod:`moe_rec.data.text_samples`) ranked
with and without their critique, against the honest baseline: rank without it, then filter.

For every ``critique_test`` (or ``critique_valid``) request the model ranks the asked service's
items exactly twice: with the critique, and with it left out (the plain request of the same
target). Reported, overall, per critique type, for seen / held-out wording families and per family:

* Recall@K / NDCG@K of the target, with and without the critique;
* the **rule filter** baseline: the ranking without the critique, items that satisfy what the
  critique asks moved first (order kept otherwise). What it asks is read from the critique's own
  record (its types, clauses and terms, and the target's brand, leaf category and colour, the
  previous item's price, size and pack), a perfect parser of the text, so the baseline is as strong
  as a rule-based reading can be; it reorders the top ``eval.filter_depth`` items (200 by default;
  set it deeper for a large catalogue, where 200 items hold few that satisfy the critique);
* **satisfaction**: the share of the top 10 that satisfies each asked type (``brand``: the
  target's brand; ``category``: the target's leaf category; ``price``: cheaper / pricier than
  the previous item, as the clause says; ``terms``: every named term in the title; ``colour``: the
  target's colour; ``size`` / ``pack``: bigger / smaller than the previous item's, as the builder
  compares them), with and without the critique.

Items are read with :func:`moe_rec.data.item_attributes.service_attributes`, as the critiques
were built.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.item_attributes import BAND_NAMES, Size, brand_key, service_attributes
from moe_rec.data.text_samples import plain_request
from moe_rec.eval.exact import (
    ServiceCatalogue,
    gathered_item_table,
    rank_exact,
    request_parts,
    request_vocabulary,
)
from moe_rec.model.item_model import MoERecForItemPrediction
from moe_rec.sid.table import SIDTable

KS = (10,)


@dataclass
class ItemFacts:
    """Per SID-table row: brand key, lower-case leaf category, price and price band name, title
    words, colour, size and pack count (None where unknown; a pack never stated is 1)."""

    brand: list[str | None]
    leaf: list[str | None]
    price: list[float | None]
    band: list[str | None] = field(default_factory=list)
    band_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> its band names
    words: list[frozenset[str]] = field(default_factory=list)
    colour: list[str | None] = field(default_factory=list)
    size: list[Size | None] = field(default_factory=list)
    pack: list[int] = field(default_factory=list)
    size_ratio: float = 1.2  # as the critiques were built (``critiques.size_ratio``)


def item_facts(items: pa.Table, table: SIDTable, cfg: CritiqueConfig) -> ItemFacts:
    """The facts of every catalogue item, in SID-table row order."""
    n = len(table.item_ids)
    facts = ItemFacts(brand=[None] * n, leaf=[None] * n, price=[None] * n, band=[None] * n,
                      words=[frozenset()] * n, colour=[None] * n, size=[None] * n, pack=[1] * n,
                      size_ratio=cfg.size_ratio)  # fmt: skip
    for service in table.services:
        attrs = service_attributes(
            items, service, num_bands=cfg.price_bands, min_band_items=cfg.min_band_items
        )
        rows = table.rows([service] * len(attrs), attrs.item_ids)
        for i, row in enumerate(rows.tolist()):
            facts.brand[row] = brand_key(attrs.brand[i]) if attrs.brand[i] else None
            facts.leaf[row] = attrs.path[i][-1].lower() if attrs.path[i] else None
            facts.price[row] = attrs.price[i]
            facts.band[row] = attrs.band_name(attrs.band[i])
            facts.words[row] = attrs.tokens[i]
            facts.colour[row] = attrs.colour[i]
            facts.size[row] = attrs.size[i]
            facts.pack[row] = attrs.pack[i] or 1
        facts.band_names[service] = BAND_NAMES[attrs.num_bands]
    return facts


def with_named_terms(
    requests: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Each request with ``terms``, the distinctive terms its critique record names (a request
    carries the record's types and clauses, not its terms), matched by user, service, previous and
    target item; and how many requests had no record (they ask for no terms)."""
    named = {(r["user"], r["service"], r["prev_item"], r["target_item"]): list(r["terms"]) for r in records}
    out, missing = [], 0
    for r in requests:
        key = (r["user"], r["service"], r["prev_item"], r["target_item"])
        missing += key not in named
        out.append({**r, "terms": named.get(key, [])})
    return out, missing


def asks(request: dict[str, Any], target: int, prev: int, facts: ItemFacts) -> dict[str, Any]:
    """What a critique asks for, from its record: ``{type: wanted}`` for the types the data can
    check (a brand key, a leaf, the terms, a colour, or ``("<" | ">", the previous item's price,
    size or pack)``), as :func:`moe_rec.data.critiques.changes` named them."""
    out: dict[str, Any] = {}
    types, clauses = set(request["types"]), set(request["clauses"])
    if "brand" in types and facts.brand[target]:
        out["brand"] = facts.brand[target]
    if "category" in types and facts.leaf[target]:
        out["category"] = facts.leaf[target]
    if "terms" in types and request.get("terms") and facts.words:
        out["terms"] = frozenset(request["terms"])
    if "colour" in types and facts.colour and facts.colour[target]:
        out["colour"] = facts.colour[target]
    if prev < 0:
        return out
    if "price" in types and facts.price[prev] is not None and clauses & {"cheaper", "pricier"}:
        out["price"] = ("<" if "cheaper" in clauses else ">", facts.price[prev])
    if "size" in types and facts.size and facts.size[prev] is not None and clauses & {"bigger", "smaller"}:
        out["size"] = ("<" if "smaller" in clauses else ">", facts.size[prev])
    if "pack" in types and facts.pack and clauses & {"bigger_pack", "smaller_pack"}:
        out["pack"] = ("<" if "smaller_pack" in clauses else ">", facts.pack[prev])
    return out


def satisfied(row: int, kind: str, wanted: Any, facts: ItemFacts) -> bool:
    """Whether the item at ``row`` is what ``wanted`` asks for."""
    if row < 0:
        return False
    if kind == "brand":
        return facts.brand[row] == wanted
    if kind == "category":
        return facts.leaf[row] == wanted
    if kind == "terms":
        return wanted <= facts.words[row]
    if kind == "colour":
        return facts.colour[row] == wanted
    op, reference = wanted
    if kind == "size":  # sizes of one kind, apart by the ratio the builder used (words: by rank)
        size = facts.size[row]
        if size is None or size.kind != reference.kind:
            return False
        ratio = facts.size_ratio if size.kind != "word" else 1.0
        return size.value * ratio < reference.value if op == "<" else size.value > reference.value * ratio
    value = facts.pack[row] if kind == "pack" else facts.price[row]
    return value is not None and (value < reference if op == "<" else value > reference)


def rule_filter(ranked: list[int], wanted: dict[str, Any], facts: ItemFacts) -> list[int]:
    """``ranked`` with the items that satisfy every ask moved first, each part in its order."""
    if not wanted:
        return ranked
    ok = [all(satisfied(r, k, w, facts) for k, w in wanted.items()) for r in ranked]
    return [r for r, good in zip(ranked, ok, strict=True) if good] + [
        r for r, good in zip(ranked, ok, strict=True) if not good
    ]


def _gains(ranked: list[int], target: int, k: int) -> tuple[float, float]:
    """(recall@k, ndcg@k) of one request with one target."""
    top = ranked[:k]
    if target not in top:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(top.index(target) + 2)


def evaluate_critiques(
    model: MoERecForItemPrediction,
    table: SIDTable,
    requests: Sequence[dict[str, Any]],
    facts: ItemFacts,
    *,
    batch_size: int = 64,
    exclude_seen: bool = False,
    depth: int,
    plain_weight: float | None = None,
) -> dict[str, float]:
    """Metrics of ``requests`` (critique requests) with and without the critique, the rule filter
    and satisfaction (module docstring): keys ``{scope}/{model}/{metric}``, scope ``all``, a type,
    ``seen`` or ``held_out``, ``family:<name>`` (the wording family), or ``seen:<type>`` /
    ``held_out:<type>`` (a type by its wording); model ``critique``, ``plain``, ``filter``; metric
    ``recall@10``, ``ndcg@10``, ``satisfied_<type>``; ``{scope}/count`` requests. ``depth``: items
    of each ranking kept, so the rule filter reorders the top ``depth`` of the ranking without the
    critique (deeper is a stronger filter: more items that satisfy the critique reach its front).
    ``plain_weight``: the ranking with the critique adds this many times the scores without it
    (default: the model's ``critique_plain_weight``; :func:`~moe_rec.eval.exact.request_parts`),
    read from the same forward as the ranking without it."""
    catalogue = ServiceCatalogue(table, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    vectors = gathered_item_table(model)
    vocab = request_vocabulary(model, table)
    ranked: dict[str, list[list[int]]] = {"critique": [], "plain": []}
    with torch.no_grad():
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            plain = [plain_request(r) for r in chunk]
            parts = request_parts(model, plain, vocab)  # one forward, both rankings read it
            mixed = request_parts(model, chunk, vocab, plain_weight=plain_weight, plain=parts)
            for name, rows, found in (("critique", chunk, mixed), ("plain", plain, parts)):
                ranked[name] += rank_exact(
                    model, catalogue, rows, depth, exclude_seen, vectors, parts=found
                ).tolist()
    model.train(was_training)
    services = [r["service"] for r in requests]
    targets = table.rows(services, [r["target_item"] for r in requests]).tolist()
    prevs = table.rows(services, [r["prev_item"] for r in requests]).tolist()
    sums: dict[str, float] = defaultdict(float)
    for j, r in enumerate(requests):
        wanted = asks(r, targets[j], prevs[j], facts)
        lists = {
            **{n: ranked[n][j] for n in ranked},
            "filter": rule_filter(ranked["plain"][j], wanted, facts),
        }
        wording = "held_out" if r["held_out"] else "seen"
        scopes = [
            "all",
            *r["types"],
            wording,
            f"family:{r['family']}",
            *(f"{wording}:{t}" for t in r["types"]),
        ]
        for scope in scopes:
            sums[f"{scope}/count"] += 1
            for name, ranking in lists.items():
                for k in KS:
                    recall, ndcg = _gains(ranking, targets[j], k)
                    sums[f"{scope}/{name}/recall@{k}"] += recall
                    sums[f"{scope}/{name}/ndcg@{k}"] += ndcg
        for kind, want in wanted.items():  # satisfaction among the top 10, where the data can check it
            sums[f"{kind}/asked"] += 1
            for name, ranking in lists.items():
                top = ranking[:10]
                sums[f"{kind}/{name}/satisfied_{kind}"] += (
                    sum(satisfied(x, kind, want, facts) for x in top) / 10
                )
    out: dict[str, float] = {}
    for key, value in sums.items():
        scope, _, metric = key.partition("/")
        if metric in ("count", "asked"):
            out[key] = value
            continue
        denominator = sums[f"{scope}/asked"] if "satisfied_" in metric else sums[f"{scope}/count"]
        out[key] = value / denominator if denominator else math.nan
    return out
