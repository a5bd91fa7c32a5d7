"""Ranking metrics for leave-one-out evaluation: Recall@K and NDCG@K with one relevant item.

Every evaluation request (one held-out event) has exactly one relevant item, the target, so

* Recall@K (= HitRate@K) is 1 when the target is among the first K ranked items, else 0;
* NDCG@K is ``1 / log2(rank + 1)`` for the target's 1-based rank when ``rank <= K``, else 0
  (the ideal DCG of a single relevant item is 1).

A ranking is a row of item indices, best first, padded with ``-1`` where a model returned fewer
items than asked. Duplicates are collapsed before ranks are counted: only the first occurrence of an
item counts and a repeated item does not take a place, so the rank of an item is one plus the number
of *distinct* items ahead of it. A beam search that yields the same item twice is thus neither
rewarded twice nor does it push the target down.

:class:`RankingMetrics` keeps sums and counts per service (never per-rank means), so results from
several ranks are combined by one ``all_reduce`` and the means are computed once, at the end, from
the global sums. The overall numbers are the micro mean over all requests; the macro mean over
services is reported beside them. :func:`metrics_table` lays the results out as a rich table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from rich.table import Table

DEFAULT_KS = (5, 10, 20)
PAD = -1  # padding in a ranking: no item
OVERALL = "all"  # row name of the micro mean in metrics_table
MACRO = "macro"  # key / row name of the macro mean over services


def target_rank(ranked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target in its ranking, counting distinct items only; 0 when absent.

    Args:
        ranked: ``(B, K_max)`` item indices, best first, ``-1`` for padding.
        target: ``(B,)`` the relevant item of each request (``>= 0``).

    Returns:
        ``(B,)`` int64 ranks; 0 where the target is not in the ranking.
    """
    if ranked.dim() != 2 or target.dim() != 1 or ranked.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected ranked (B, K) and target (B,), got {tuple(ranked.shape)} and {tuple(target.shape)}"
        )
    if (target < 0).any():
        raise ValueError("targets must be item indices >= 0")
    k_max = ranked.shape[1]
    valid = ranked != PAD  # (B, K)
    same = ranked.unsqueeze(2) == ranked.unsqueeze(1)  # (B, K, K): same[b, i, j] = item i == item j
    earlier = torch.ones(k_max, k_max, dtype=torch.bool, device=ranked.device).tril(-1)  # j < i
    first = valid & ~(same & earlier).any(dim=2)  # (B, K): the first occurrence of a real item
    hit = first & (ranked == target.unsqueeze(1))  # (B, K): at most one True per row
    distinct_rank = first.long().cumsum(dim=1)  # (B, K): rank of each first occurrence
    return (distinct_rank * hit).sum(dim=1)  # (B,)


def all_reduce_(t: torch.Tensor) -> None:
    """Sum ``t`` over ranks in place, as ``dist.all_reduce`` does, wherever ``t`` lives: NCCL
    reduces GPU tensors only, so there a CPU tensor's sum goes through this rank's GPU."""
    if t.device.type != "cuda" and dist.get_backend() == dist.Backend.NCCL:
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t)


class RankingMetrics:
    """Accumulates Recall@K and NDCG@K sums and request counts per service.

    Args:
        services: every service that may appear, in the same order on every rank (the sums are
            all-reduced position by position).
        ks: cut-offs K.
        prefix: first part of every result key (``test`` -> ``test/recall@10``).
        groups: further scopes a request may also count in (e.g. ``cold`` / ``warm`` targets),
            reported like services but left out of the macro mean.
    """

    def __init__(
        self,
        services: Sequence[str],
        ks: Sequence[int] = DEFAULT_KS,
        prefix: str = "test",
        groups: Sequence[str] = (),
    ) -> None:
        if len(set(services)) != len(services) or not services:
            raise ValueError(f"services must be a non-empty list of distinct names, got {list(services)}")
        if set(groups) & set(services) or len(set(groups)) != len(groups):
            raise ValueError(f"groups {list(groups)} must be distinct and differ from the services")
        reserved = {MACRO, OVERALL} & (set(services) | set(groups))
        if reserved:
            raise ValueError(f"{sorted(reserved)} are reserved row names and cannot name a service")
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        self.services = list(services)
        self.ks = tuple(sorted(set(ks)))
        self.prefix = prefix
        self.groups = list(groups)
        self._index = {s: i for i, s in enumerate(self.services + self.groups)}
        # (S + G, 1 + 2 * len(ks)) float64: [count, recall@k..., ndcg@k...] summed per service, then group
        self.sums = torch.zeros(len(self._index), 1 + 2 * len(self.ks), dtype=torch.float64)
        self._reduced = False

    def update(
        self,
        ranked: torch.Tensor,
        target: torch.Tensor,
        services: Sequence[str],
        groups: Sequence[str] | None = None,
    ) -> None:
        """Add one batch of requests.

        Args:
            ranked: ``(B, K_max)`` item indices, best first, ``-1`` for padding. With
                ``K_max < K`` the metric at K counts only the items given.
            target: ``(B,)`` the held-out item of each request.
            services: the service of each request (``B`` names).
            groups: with ``groups`` at construction, the group of each request (``B`` names).
        """
        if len(services) != target.shape[0]:
            raise ValueError(f"{len(services)} services for {target.shape[0]} requests")
        unknown = set(services) - set(self.services)
        if unknown:
            raise ValueError(f"unknown service(s) {sorted(unknown)}; expected one of {self.services}")
        if (groups is None) != (not self.groups) or (groups is not None and len(groups) != len(services)):
            raise ValueError(f"expected one of the groups {self.groups} per request, got {groups!r}")
        if groups is not None and set(groups) - set(self.groups):
            raise ValueError(
                f"unknown group(s) {sorted(set(groups) - set(self.groups))}; expected {self.groups}"
            )
        rank = target_rank(ranked, target).cpu()  # (B,)
        found = rank > 0
        gain = torch.where(found, 1.0 / torch.log2(rank.double() + 1.0), torch.zeros((), dtype=torch.float64))
        columns = [torch.ones_like(gain)]
        columns += [(found & (rank <= k)).double() for k in self.ks]
        columns += [torch.where(rank <= k, gain, 0.0) for k in self.ks]  # gain is 0 where not found
        values = torch.stack(columns, dim=1)  # (B, C)
        for labels in (services, groups) if groups is not None else (services,):
            rows = torch.tensor([self._index[s] for s in labels], dtype=torch.long)  # (B,)
            self.sums.index_add_(0, rows, values)  # (S + G, C) += (B, C)

    def reduce(self) -> None:
        """Sum the counts of all ranks (a no-op without an initialised process group).

        Call it once, on every rank, after the last :meth:`update`; a second call raises, since it
        would count every request again.
        """
        if self._reduced:
            raise RuntimeError("RankingMetrics.reduce() was already called")
        self._reduced = True
        if dist.is_available() and dist.is_initialized():
            all_reduce_(self.sums)

    def compute(self) -> dict[str, float]:
        """Means from the accumulated sums.

        Returns:
            ``{prefix}/recall@K`` and ``{prefix}/ndcg@K`` (micro mean over all requests),
            ``{prefix}/macro/...`` (mean over services that have requests) and
            ``{prefix}/{service}/...`` per service (then group) with requests, plus ``.../count``
            request counts.
        """
        n = len(self.ks)
        names = ["count"] + [f"recall@{k}" for k in self.ks] + [f"ndcg@{k}" for k in self.ks]
        scopes = self.services + self.groups
        sums = self.sums[: len(self.services)]  # groups repeat requests: the totals read services only
        counts = sums[:, 0]  # (S,)
        present = counts > 0
        out: dict[str, float] = {f"{self.prefix}/count": float(counts.sum())}
        total = sums.sum(dim=0)  # (C,)
        for j, name in enumerate(names[1:], start=1):
            out[f"{self.prefix}/{name}"] = float(total[j] / total[0]) if total[0] > 0 else math.nan
        means = sums[present, 1:] / counts[present].unsqueeze(1)  # (S', 2n)
        out[f"{self.prefix}/{MACRO}/count"] = float(present.sum())  # services with requests
        for j in range(2 * n):
            out[f"{self.prefix}/{MACRO}/{names[j + 1]}"] = (
                float(means[:, j].mean()) if len(means) else math.nan
            )
        for i, scope in enumerate(scopes):
            count = float(self.sums[i, 0])
            if not count:
                continue
            out[f"{self.prefix}/{scope}/count"] = count
            for j, name in enumerate(names[1:], start=1):
                out[f"{self.prefix}/{scope}/{name}"] = float(self.sums[i, j] / count)
        return out


def metrics_table(
    results: dict[str, float], ks: Sequence[int] = DEFAULT_KS, title: str | None = None
) -> Table:
    """Results of :meth:`RankingMetrics.compute` as a table: one row per service, then the micro
    mean (``all``) and the macro mean; columns requests, R@K and N@K for each K."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) == 2:  # prefix/metric
            rows.setdefault(OVERALL, {})[parts[1]] = value
        elif len(parts) == 3:  # prefix/service/metric
            rows.setdefault(parts[1], {})[parts[2]] = value
    table = Table(title=title)
    table.add_column("service")
    table.add_column("requests", justify="right")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
        table.add_column(f"N@{k}", justify="right")
    services = sorted(r for r in rows if r not in (OVERALL, MACRO))
    means = [r for r in (OVERALL, MACRO) if r in rows]
    for name in services + means:
        if services and means and name == means[0]:
            table.add_section()  # the means below the services
        row = rows[name]
        cells = [name, "-" if name == MACRO else f"{int(row.get('count', 0)):,}"]
        for k in ks:
            cells += [_fmt(row.get(f"recall@{k}")), _fmt(row.get(f"ndcg@{k}"))]
        table.add_row(*cells)
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"
