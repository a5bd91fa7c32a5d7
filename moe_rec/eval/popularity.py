"""The "most popular" baseline: per service, every user gets the items most often seen in training.

It is the floor every learned recommender has to clear under the same protocol (leave-one-out,
full ranking over the items of the service, Recall@K / NDCG@K), and a check that the evaluation
itself is wired up right: its numbers follow from item counts alone.

* :class:`MostPopular` counts interactions per ``(service, item)`` in the training events and ranks
  each service's items by count, ties by item id, so the ranking is the same on every run.
  Items without a training interaction are never recommended.
* :func:`evaluate_events` / :func:`evaluate_popularity` build one request per held-out event of a
  split (user, service, target item; the history is the user's earlier events in that service) and
  score the baseline's top items with :class:`~moe_rec.eval.metrics.RankingMetrics`. With
  ``exclude_seen`` the items of the history are not recommended again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from moe_rec.data import store
from moe_rec.data.cold_start import cold_groups, cold_labels, drop_cold_training
from moe_rec.eval.metrics import DEFAULT_KS, PAD, RankingMetrics

BATCH = 4096  # requests scored per RankingMetrics.update


class MostPopular:
    """Ranks each service's items by training interaction count (ties by item id)."""

    def __init__(self) -> None:
        self.ranking: dict[str, list[str]] = {}  # service -> item ids, most popular first
        self.counts: dict[str, Counter[str]] = {}  # service -> item id -> interactions

    def fit(self, events_train: pa.Table) -> MostPopular:
        """Count every row of ``events_train`` (the caller passes the training split).

        Args:
            events_train: events with at least the columns ``service`` and ``item_id``.
        """
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        services = events_train.column("service").to_pylist()
        items = events_train.column("item_id").to_pylist()
        for service, item in zip(services, items):
            counts[service][item] += 1
        self.counts = dict(counts)
        self.ranking = {
            service: sorted(c, key=lambda item, c=c: (-c[item], item)) for service, c in self.counts.items()
        }
        return self

    def rank(self, services: list[str], k: int, exclude: list[set[str]] | None = None) -> list[list[str]]:
        """The top ``k`` items for each request.

        Args:
            services: the service of each request.
            k: items per request (fewer when the service has fewer items left).
            exclude: per request, items not to recommend (e.g. the user's history).

        Returns:
            One list of at most ``k`` item ids per request, most popular first.
        """
        if exclude is not None and len(exclude) != len(services):
            raise ValueError(f"{len(exclude)} exclusion sets for {len(services)} requests")
        out = []
        for i, service in enumerate(services):
            ranking = self.ranking.get(service, [])
            if not exclude or not exclude[i]:
                out.append(ranking[:k])
                continue
            top: list[str] = []
            for item in ranking:
                if item not in exclude[i]:
                    top.append(item)
                    if len(top) == k:
                        break
            out.append(top)
        return out


@dataclass(frozen=True)
class Request:
    """One held-out event to predict."""

    user: str
    service: str
    target: str  # the held-out item id
    history: frozenset[str]  # item ids of the user's earlier events in the service


def build_requests(events: pa.Table, split: str) -> list[Request]:
    """One request per ``split`` event, with the user's earlier events in its service as history.

    Args:
        events: events of all splits (``user``, ``service``, ``item_id``, ``position``, ``split``).
        split: the held-out split, ``valid`` or ``test``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cols = {c: events.column(c).to_pylist() for c in ("user", "service", "item_id", "position", "split")}
    histories: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for user, service, item, position in zip(
        cols["user"], cols["service"], cols["item_id"], cols["position"]
    ):
        histories[user, service].append((position, item))
    requests = []
    for user, service, item, position, row_split in zip(*cols.values()):
        if row_split == split:
            earlier = frozenset(i for p, i in histories[user, service] if p < position)
            requests.append(Request(user, service, item, earlier))
    return requests


def evaluate_events(
    events: pa.Table,
    split: str = "test",
    exclude_seen: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    cold: set[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Fit :class:`MostPopular` on the ``train`` events and score it on the ``split`` events, in one
    process over all requests (nothing to all-reduce).

    Args:
        events: events of all splits of every service (``EVENT_SCHEMA``).
        split: ``valid`` or ``test``.
        exclude_seen: do not recommend items of the request's history.
        ks: cut-offs K.
        cold: items kept out of training (the cold-start benchmark): their training events are not
            counted, and cold and warm targets are reported beside the services.

    Returns:
        :meth:`RankingMetrics.compute` results with the prefix ``split``.
    """
    services = sorted(set(events.column("service").to_pylist()))
    events = drop_cold_training(events, cold)
    train = events.filter(pc.equal(events.column("split"), "train"))
    model = MostPopular().fit(train)
    requests = build_requests(events, split)
    metrics = RankingMetrics(services, ks=ks, prefix=split, groups=cold_groups(cold))
    index: dict[tuple[str, str], int] = {}  # (service, item id) -> integer id for the metric

    def ids(service: str, items: Sequence[str]) -> list[int]:
        return [index.setdefault((service, item), len(index)) for item in items]

    k_max = max(ks)
    for start in range(0, len(requests), BATCH):
        batch = requests[start : start + BATCH]
        services = [r.service for r in batch]
        exclude = [set(r.history) for r in batch] if exclude_seen else None
        top = model.rank(services, k_max, exclude)
        ranked = torch.full((len(batch), k_max), PAD, dtype=torch.long)  # (B, K_max)
        for row, (service, items) in enumerate(zip(services, top)):
            ranked[row, : len(items)] = torch.tensor(ids(service, items), dtype=torch.long)
        target = torch.tensor([ids(r.service, [r.target])[0] for r in batch], dtype=torch.long)  # (B,)
        metrics.update(ranked, target, services, cold_labels(services, [r.target for r in batch], cold))
    return metrics.compute()


def evaluate_popularity(
    data_dir: Path,
    split: str = "test",
    exclude_seen: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    cold: set[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """:func:`evaluate_events` on the events of a prepared data directory (all splits are loaded:
    the training split for the counts, every split for the histories)."""
    events = store.load_table(Path(data_dir))
    return evaluate_events(events, split=split, exclude_seen=exclude_seen, ks=ks, cold=cold)
