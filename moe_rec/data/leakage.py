"""Does a critique give its target away? Two checks, both independent of how critiques are made.

* :func:`mentions` — a text holds the item's title (word for word, case and punctuation aside) or
  its id. The builder drops such a critique (counted as ``mentions_target``) and the tests assert
  that none is left.
* :func:`retrieval_leakage` — given only the critique's text, plain BM25 over the service's item
  titles (the keyword text where an item has no title) ranks every item: how often is the target
  first, how often in the top 10? Ties are broken at random, in expectation (a query that matches
  nothing leaves the target among all N tied items: 1/N, not a hit). The same is measured with the
  previous item's title as the query, and with both, as references: a critique should say little
  about the target beyond what the previous item already says.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from moe_rec.data.item_attributes import ItemAttributes, words

_NON_WORD = re.compile(r"[^a-z0-9]+")


def _normal(text: str) -> str:
    return " " + _NON_WORD.sub(" ", text.lower()).strip() + " "


def mentions(text: str, title: str | None, item_id: str) -> bool:
    """True when ``text`` contains ``title`` (as whole words) or ``item_id`` (as one word)."""
    norm = _normal(text)
    if title and _normal(title).strip() and _normal(title) in norm:
        return True
    return _normal(item_id) in norm


class BM25:
    """Okapi BM25 over a fixed list of documents (numpy postings, no dependencies).

    Args:
        docs: one text per document (None: empty).
        k1, b: the usual BM25 constants.
    """

    def __init__(self, docs: Sequence[str | None], k1: float = 1.2, b: float = 0.75) -> None:
        self.n = len(docs)
        tfs = [Counter(words(d)) for d in docs]
        lengths = np.array([sum(tf.values()) for tf in tfs], dtype=np.float64)
        avg = lengths.mean() if self.n and lengths.mean() > 0 else 1.0
        postings: dict[str, list[tuple[int, int]]] = {}
        for i, tf in enumerate(tfs):
            for term, count in tf.items():
                postings.setdefault(term, []).append((i, count))
        self.docs: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        for term, plist in postings.items():
            rows = np.array([i for i, _ in plist], dtype=np.int64)
            tf = np.array([c for _, c in plist], dtype=np.float64)
            idf = math.log(1.0 + (self.n - len(plist) + 0.5) / (len(plist) + 0.5))
            norm = tf + k1 * (1.0 - b + b * lengths[rows] / avg)
            self.docs[term] = rows
            self.weights[term] = idf * tf * (k1 + 1.0) / norm

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every document for ``query`` (each query word counted once)."""
        return self.batch_scores([query])[0]

    def batch_scores(self, queries: Sequence[str]) -> np.ndarray:
        """(B, N) scores of ``queries``: every posting of every query word added in one bincount."""
        flat, weight = [], []
        for q, query in enumerate(queries):
            for term in set(words(query)):
                if term in self.docs:
                    flat.append(self.docs[term] + q * self.n)
                    weight.append(self.weights[term])
        if not flat:
            return np.zeros((len(queries), self.n))
        out = np.bincount(np.concatenate(flat), np.concatenate(weight), minlength=len(queries) * self.n)
        return out.reshape(len(queries), self.n)

    def hit_rates(
        self, queries: Sequence[str], targets: Sequence[int], ks: Sequence[int] = (1, 10), batch: int = 256
    ) -> np.ndarray:
        """(Q, len(ks)): P(target in the top k) per query, ties broken uniformly at random."""
        out = np.zeros((len(queries), len(ks)))
        k = np.asarray(ks, dtype=np.float64)[None, :]  # (1, K)
        for start in range(0, len(queries), batch):
            s = self.batch_scores(queries[start : start + batch])  # (B, N)
            t = np.asarray(targets[start : start + batch])
            own = s[np.arange(len(t)), t][:, None]  # (B, 1)
            above = (s > own).sum(axis=1, keepdims=True)  # (B, 1)
            tied = (s == own).sum(axis=1, keepdims=True)  # (B, 1), the target included
            out[start : start + len(t)] = np.clip((k - above) / tied, 0.0, 1.0)
        return out


QUERIES = ("critique", "previous", "previous+critique")


def hit_rates(
    rows: Sequence[dict], attrs: dict[str, ItemAttributes], index: dict[str, BM25] | None = None
) -> dict[str, np.ndarray]:
    """Per query kind, (R, 2) top-1 / top-10 hit rates of ``rows`` (critique rows: service,
    prev_item, target_item, text); ``index`` caches each service's BM25 between calls."""
    index = index if index is not None else {}
    out = {name: np.zeros((len(rows), 2)) for name in QUERIES}
    by_service: dict[str, list[int]] = {}
    for r, row in enumerate(rows):
        by_service.setdefault(row["service"], []).append(r)
    for service, members in by_service.items():
        a = attrs[service]
        if service not in index:
            index[service] = BM25(a.title)
        targets = [a.row[rows[r]["target_item"]] for r in members]
        prev = [a.title[a.row[rows[r]["prev_item"]]] or "" for r in members]
        text = [rows[r]["text"] for r in members]
        queries = {
            "critique": text,
            "previous": prev,
            "previous+critique": [f"{p} {c}" for p, c in zip(prev, text)],
        }
        for name, q in queries.items():
            out[name][members] = index[service].hit_rates(q, targets)
    return out


def retrieval_leakage(
    rows: Sequence[dict],
    attrs: dict[str, ItemAttributes],
    index: dict[str, BM25] | None = None,
    rates: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 / top-10 shares of ``rows`` per service and over all, for three queries:
    ``critique`` (the text alone: the leakage number), ``previous`` (the previous item's title)
    and ``previous+critique``; ``chance`` is what a random ranking gets.

    Returns:
        ``{scope: {"n", "critique_top1", "critique_top10", "previous_top1", ..., "chance_top1",
        "chance_top10"}}`` with scope a service or ``all``.
    """
    rates = rates if rates is not None else hit_rates(rows, attrs, index)
    services = np.array([row["service"] for row in rows], dtype=object)
    out: dict[str, dict[str, float]] = {}
    for scope in [*sorted(set(services)), "all"]:
        mask = np.ones(len(rows), dtype=bool) if scope == "all" else services == scope
        n = int(mask.sum())
        sizes = np.array([len(attrs[s]) for s in services[mask]], dtype=np.float64)
        summary: dict[str, float] = {"n": n}
        for name in QUERIES:
            summary[f"{name}_top1"] = round(float(rates[name][mask, 0].mean()), 4)
            summary[f"{name}_top10"] = round(float(rates[name][mask, 1].mean()), 4)
        summary["chance_top1"] = round(float((1.0 / sizes).mean()), 5)
        summary["chance_top10"] = round(float(np.minimum(1.0, 10.0 / sizes).mean()), 5)
        out[scope] = summary
    return out
