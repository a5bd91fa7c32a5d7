"""How well a narrative fits the item it explains, and how varied narratives are (issue #19).

* **Consistency**: the narrative embedded with the SID stage's text encoder (MiniLM by default)
  ranks every item of the service by cosine with the items' text embeddings; the emitted item's
  rank gives MRR and Hit@10. A narrative that says nothing about its item ranks it like chance
  (MRR about ``ln(N) / N``).
* **Diversity**: distinct-n (distinct n-grams over all n-grams, whitespace words, n = 1, 2), and
  the share of narratives that are exactly another request's.
* **Faithfulness**: every brand, leaf category and price band a narrative names, found by
  searching it for the catalogue's own values (not by reading the templates that wrote the
  training narratives), checked against the explained item: precision and coverage.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_rec.eval.critiques import ItemFacts


def consistency(
    narrative_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    items: Sequence[int],
    candidates: Sequence[torch.Tensor],
) -> dict[str, float]:
    """MRR and Hit@10 of each emitted item among its candidates when its narrative is the query.

    Args:
        narrative_vectors: (M, D) the narratives' embeddings.
        item_vectors: (N, D) every catalogue item's text embedding (SID-table rows).
        items: the M emitted items' table rows.
        candidates: per narrative, the table rows it is ranked among (its service's items).
    """
    reciprocal, hits = 0.0, 0.0
    queries = F.normalize(narrative_vectors.float(), dim=-1)
    keys = F.normalize(item_vectors.float(), dim=-1)
    for query, item, rows in zip(queries, items, candidates, strict=True):
        scores = keys[rows] @ query  # (C,)
        mine = scores[(rows == item).nonzero().flatten()[0]]
        rank = int((scores > mine).sum()) + 1  # ties count in the item's favour
        reciprocal += 1.0 / rank
        hits += float(rank <= 10)
    n = max(len(items), 1)
    return {"mrr": reciprocal / n, "hit@10": hits / n}


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1, distinct-2 (over whitespace words of all texts) and the share of texts that
    another text repeats exactly."""
    out = {}
    for n in (1, 2):
        grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
        out[f"distinct-{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    counts = Counter(texts)
    out["repeated"] = sum(c for c in counts.values() if c > 1) / len(texts) if texts else 0.0
    return out


def _words(text: str) -> str:
    """Lower-case words joined by single spaces, with spaces around (for whole-word search)."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def mentions(text: str, phrases: Iterable[str]) -> set[str]:
    """The ``phrases`` (lower-case words) that ``text`` names as whole words; a phrase found only
    inside a longer found one ("food" in "baby food") is not counted."""
    found: list[str] = []
    words = _words(text)
    for phrase in sorted({_words(p).strip() for p in phrases if _words(p).strip()}, key=len, reverse=True):
        if f" {phrase} " in words and not any(f" {phrase} " in f" {longer} " for longer in found):
            found.append(phrase)
    return set(found)


def faithfulness(
    texts: Sequence[str], facts: Sequence[Mapping[str, str | None]], vocab: Sequence[Mapping[str, set[str]]]
) -> dict[str, float]:
    """Precision and coverage of what narratives name about their item, read with the catalogue's
    own values, not the templates: for each kind (``brand``, ``category``, ``band``), the values of
    ``vocab`` a narrative names (:func:`mentions`) against its item's value in ``facts``.

    Args:
        texts: the narratives.
        facts: per narrative, its item's value of each kind (None: the item has none).
        vocab: per narrative, every value of each kind in its service's catalogue.

    Returns:
        ``precision`` (named values that are the item's, over all named values), ``coverage``
        (the item's values that are named, over those it has), ``mentions`` per narrative.
    """
    named = right = known = covered = 0
    for text, fact, values in zip(texts, facts, vocab, strict=True):
        for kind, options in values.items():
            said = mentions(text, options)
            truth = _words(fact[kind]).strip() if fact.get(kind) else None
            named += len(said)
            right += truth in said
            known += truth is not None
            covered += truth is not None and truth in said
    return {
        "precision": right / named if named else math.nan,
        "coverage": covered / known if known else math.nan,
        "mentions": named / len(texts) if texts else 0.0,
    }


def narrative_facts(
    facts: ItemFacts, services: Sequence[str], service_rows: Mapping[str, torch.Tensor], rows: Sequence[int]
) -> tuple[list[dict[str, str | None]], list[dict[str, set[str]]]]:
    """For :func:`faithfulness`: the brand, leaf category and price band of the items at table
    ``rows`` (of ``services``), and every such value of each one's service.

    Args:
        facts: the catalogue's facts (:func:`moe_rec.eval.critiques.item_facts`).
        services: the service of each of ``rows``.
        service_rows: every table row of each service, (N_s,).
        rows: the explained items' table rows.
    """
    vocab = {
        s: {
            "brand": {facts.brand[r] for r in all_rows.tolist() if facts.brand[r]},
            "category": {facts.leaf[r] for r in all_rows.tolist() if facts.leaf[r]},
            "band": set(facts.band_names[s]),
        }
        for s, all_rows in service_rows.items()
    }
    own = [{"brand": facts.brand[r], "category": facts.leaf[r], "band": facts.band[r]} for r in rows]
    return own, [vocab[s] for s in services]
