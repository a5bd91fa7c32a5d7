"""How well a narrative fits the item it explains, and how varied narratives are (issue #19).

* **Consistency**: the narrative embedded with the SID stage's text encoder (MiniLM by default)
  ranks every item of the service by cosine with the items' text embeddings; the emitted item's
  rank gives MRR and Hit@10. A narrative that says nothing about its item ranks it like chance
  (MRR about ``ln(N) / N``).
* **Diversity**: distinct-n (distinct n-grams over all n-grams, whitespace words, n = 1, 2), and
  the share of narratives that are exactly another request's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
