"""The final dedup code that makes every item's full semantic ID unique.

Items of one service whose quantiser codes ``(c1..cL)`` are equal (same text, near-duplicate
listings, a crowded cell) are told apart by one more code: 0, 1, 2, ... in order of ``item_id``,
so the assignment depends only on the catalogue, not on row order. Items of different services
never collide because the service is its own token in front of the codes. The dedup code has a
fixed range ``[0, max_dedup)`` (it is a vocabulary in the model), so a larger collision group is an
error that says how to get out of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe_rec.errors import MoeRecError


class DedupOverflowError(MoeRecError, ValueError):
    """More items share one ``(service, c1..cL)`` than the dedup code can tell apart."""


def assign_dedup(
    services: Sequence[str], item_ids: Sequence[str], codes: torch.Tensor, max_dedup: int
) -> torch.Tensor:
    """Dedup code of every item: its rank by ``item_id`` among items with equal (service, codes).

    Args:
        services: (N,) service of each item.
        item_ids: (N,) item id of each item.
        codes: (N, L) quantiser codes.
        max_dedup: size of the dedup code range.
    Returns:
        (N,) int64 in ``[0, max_dedup)``.
    Raises:
        DedupOverflowError: a group has more than ``max_dedup`` items.
    """
    n = codes.shape[0]
    if not (len(services) == len(item_ids) == n):
        raise ValueError(f"{len(services)} services, {len(item_ids)} item ids and {n} code rows must agree")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    service_arr = np.asarray(services, dtype=str)
    id_arr = np.asarray(item_ids, dtype=str)
    c = codes.cpu().numpy()
    order = np.lexsort((id_arr, *(c[:, level] for level in reversed(range(c.shape[1]))), service_arr))
    s_sorted, c_sorted = service_arr[order], c[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (s_sorted[1:] != s_sorted[:-1]) | (c_sorted[1:] != c_sorted[:-1]).any(1)
    starts = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))  # first sorted row of each group
    rank = np.arange(n) - starts
    dedup = np.empty(n, dtype=np.int64)
    dedup[order] = rank
    if rank.max() >= max_dedup:
        worst = int(rank.argmax())
        members = order[starts[worst] : worst + 1]
        raise DedupOverflowError(
            f"{len(members)} items of service {str(s_sorted[worst])!r} share the codes {c_sorted[worst].tolist()} "
            f"(e.g. {id_arr[members[:5]].tolist()}), more than max_dedup={max_dedup} can tell apart; "
            "raise levels, codebook_size or max_dedup (or check the catalogue for duplicate texts)"
        )
    return torch.from_numpy(dedup)
