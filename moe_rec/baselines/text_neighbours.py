"""The text nearest-neighbour baseline: rank a service's items by how close their text embedding
is to the last item of the request's history (cosine, the SID stage's encoder), that item itself
left out.

It needs no training, so it scores an item never seen in training exactly as a seen one: the
cold-start benchmark's content-only floor (``moe-rec eval --baseline text``). A request with an
empty history ranks nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_rec.baselines.sasrec import build_service_data, rank_items
from moe_rec.data import store
from moe_rec.data.cold_start import cold_groups, cold_labels
from moe_rec.eval.metrics import DEFAULT_KS, RankingMetrics
from moe_rec.sid.build import item_embeddings
from moe_rec.sid.config import SIDConfig

BATCH = 1024  # requests scored at once


def evaluate_text_neighbours(
    data_dir: Path,
    sid_cfg: SIDConfig,
    cache_dir: Path,
    split: str = "test",
    exclude_seen: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    cold: set[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Score ``split`` of a prepared data directory with the last item's text neighbours.

    Args:
        data_dir: a prepared data directory (events of all splits, catalogue).
        sid_cfg: the ``sid`` config section (its encoder embeds the item texts; cached).
        cache_dir: the embedding cache root.
        split: ``valid`` or ``test``.
        exclude_seen: do not rank items of the request's history.
        ks: cut-offs K.
        cold: items kept out of training (metrics for cold and warm targets beside the services).

    Returns:
        :meth:`RankingMetrics.compute` results with the prefix ``split``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    events = store.load_table(Path(data_dir))
    items = store.load_table(Path(data_dir), store.ITEMS_DIR)
    vectors, _, _ = item_embeddings(items, sid_cfg, cache_dir)
    vectors = F.normalize(vectors.float(), dim=-1)  # (N_all, D)
    row_of = {
        key: i
        for i, key in enumerate(zip(items.column("service").to_pylist(), items.column("item_id").to_pylist()))
    }
    services = sorted(set(events.column("service").to_pylist()))
    metrics = RankingMetrics(services, ks=ks, prefix=split, groups=cold_groups(cold))
    k = max(metrics.ks)
    for service in services:
        data = build_service_data(events, items, service)
        rows = torch.tensor([row_of[service, item] for item in data.items])
        table = vectors[rows]  # (N, D), row i = item i+1
        requests = data.requests[split]
        for start in range(0, len(requests), BATCH):
            batch = requests[start : start + BATCH]
            last = torch.tensor([history[-1] - 1 if history else 0 for history, _ in batch])  # (B,)
            scores = table[last] @ table.T  # (B, N) cosine to the last item
            # the last item is the question, not an answer
            scores[torch.arange(len(batch)), last] = -torch.inf
            scores[torch.tensor([not history for history, _ in batch])] = -torch.inf  # nothing to go on
            exclude = [history for history, _ in batch] if exclude_seen else None
            ranked = rank_items(scores, k, exclude)
            targets = [t for _, t in batch]
            labels = cold_labels([service] * len(batch), [data.items[t - 1] for t in targets], cold)
            metrics.update(ranked, torch.tensor(targets), [service] * len(batch), labels)
    return metrics.compute()
