"""Quality numbers of a semantic-ID assignment, computed once here for ``stats.json`` and reports.

* codebook use per level: share of the K codes used, and perplexity ``exp(entropy)`` of the code
  distribution (K when perfectly balanced, 1 when every item gets the same code);
* collision rate before dedup: share of items whose ``(service, c_1..c_L)`` another item also has;
* largest dedup depth: the size of the largest such group (dedup codes it needs);
* category coherence: how much more often two items that share the first code share a (leaf)
  category than two random items do. 1 means the first code knows nothing about categories.

Coherence is exact, not sampled: over all pairs, ``sum_{code,cat} C(n,2) / sum_code C(n,2)``
against ``sum_cat C(n,2) / C(N,2)``, counting only items that have a category.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> list[dict[str, float]]:
    """Per level of ``codes`` (N, L): codes used, their share of K, and perplexity."""
    out = []
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level].cpu(), minlength=codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        out.append(
            {
                "used": int((counts > 0).sum()),
                "used_frac": float((counts > 0).sum()) / codebook_size,
                "perplexity": float(torch.exp(-(p * p.log()).sum())),
            }
        )
    return out


def _group_sizes(service_index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Size (N,) of each item's group of equal ``(service, codes)``."""
    keys = torch.cat([service_index[:, None].long().cpu(), codes.long().cpu()], 1)
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    return counts[inverse]


def collision_rate(service_index: torch.Tensor, codes: torch.Tensor) -> float:
    """Share of items (N,) whose ``(service, codes (N, L))`` is shared with another item."""
    if codes.shape[0] == 0:
        return 0.0
    return float((_group_sizes(service_index, codes) > 1).double().mean())


def max_dedup_depth(service_index: torch.Tensor, codes: torch.Tensor) -> int:
    """Largest number of items sharing ``(service, codes (N, L))``: the dedup codes needed."""
    return int(_group_sizes(service_index, codes).max()) if codes.shape[0] else 0


def leaf_categories(categories: Sequence[Sequence[str] | None]) -> list[str | None]:
    """Last non-empty entry of each category path (``None`` when the item has none)."""
    leaves: list[str | None] = []
    for path in categories:
        names = [c.strip() for c in path or () if c and c.strip()]
        leaves.append(names[-1] if names else None)
    return leaves


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def category_coherence(codes: torch.Tensor, categories: Sequence[str | None]) -> dict[str, Any]:
    """Rate of sharing a category for item pairs with equal first code vs random pairs.

    Args:
        codes: (N,) first-level codes, or (N, L) codes of which the first column is used.
        categories: (N,) one (leaf) category per item; ``None`` items are left out.
    Returns:
        ``same_code_rate``, ``random_rate``, ``ratio`` (``None`` when undefined) and the item / pair counts.
    """
    first = (codes[:, 0] if codes.ndim == 2 else codes).cpu().numpy()
    keep = np.array([c is not None for c in categories], dtype=bool)
    if len(first) != len(keep):
        raise ValueError(f"{len(first)} codes for {len(keep)} categories")
    first = first[keep]
    _, cat = np.unique(np.asarray([c for c in categories if c is not None], dtype=str), return_inverse=True)
    n = len(first)
    same_code_pairs = _pairs(np.unique(first, return_counts=True)[1]) if n else 0
    same_both = _pairs(np.unique(np.stack([first, cat]), axis=1, return_counts=True)[1]) if n else 0
    same_cat = _pairs(np.unique(cat, return_counts=True)[1]) if n else 0
    all_pairs = n * (n - 1) // 2
    same_code_rate = same_both / same_code_pairs if same_code_pairs else None
    random_rate = same_cat / all_pairs if all_pairs else None
    ratio = same_both / same_code_pairs / random_rate if same_code_pairs and same_cat else None
    return {
        "same_code_rate": same_code_rate,
        "random_rate": random_rate,
        "ratio": ratio,
        "items": n,
        "same_code_pairs": same_code_pairs,
    }
