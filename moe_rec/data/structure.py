"""Measures of the structure a recommender can learn from a prepared data set.

Used to check the synthetic generator's planted structure (``tools/bench_synthetic.py
--structure``, ``tests/data/test_synthetic.py``) and handy on any source: how often users re-buy,
how concentrated popularity is, how many services users span, and whether a user's taste in one
service matches their taste in another.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa


def histories(events: pa.Table) -> dict[tuple[str, str], list[str]]:
    """Item ids per ``(user, service)`` in table order (chronological for a prepared table)."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for user, service, item in zip(
        events["user"].to_pylist(), events["service"].to_pylist(), events["item_id"].to_pylist(), strict=True
    ):
        out[(user, service)].append(item)
    return out


def repeat_rate(hist: dict[tuple[str, str], list[str]], service: str) -> float:
    """Share of a service's events (after the first of each history) whose item the history had before."""
    repeats = total = 0
    for (_, s), items in hist.items():
        if s != service:
            continue
        seen: set[str] = set()
        for k, item in enumerate(items):
            repeats += k > 0 and item in seen
            total += k > 0
            seen.add(item)
    return repeats / total if total else 0.0


def top_shares(events: pa.Table) -> tuple[float, float]:
    """Shares of all events on the most popular 10% and 1% of the items that have events."""
    counts = Counter(zip(events["service"].to_pylist(), events["item_id"].to_pylist(), strict=True))
    c = np.sort(np.fromiter(counts.values(), dtype=np.int64))[::-1]
    return float(c[: len(c) // 10].sum() / c.sum()), float(c[: len(c) // 100].sum() / c.sum())


def services_per_user(events: pa.Table) -> Counter:
    """How many users are active in 1, 2, 3, ... services."""
    per_user: dict[str, set[str]] = defaultdict(set)
    for user, service in zip(events["user"].to_pylist(), events["service"].to_pylist(), strict=True):
        per_user[user].add(service)
    return Counter(len(s) for s in per_user.values())


def taste_similarity(events: pa.Table, items: pa.Table, a: str, b: str) -> tuple[float, float, int]:
    """Cosine similarity of users' top-level-category mixes in services ``a`` and ``b``.

    Returns:
        (mean over users active in both, the same with each user's ``b`` mix replaced by the next
        user's — the level a shared taste must beat, number of such users).
    """
    department = {(r["service"], r["item_id"]): (r["categories"] or ["?"])[0] for r in items.to_pylist()}
    names = sorted(set(department.values()))
    hist = histories(events)
    users = sorted({u for u, s in hist if s == a} & {u for u, s in hist if s == b})
    if len(users) < 2:
        return float("nan"), float("nan"), len(users)

    def mix(user: str, service: str) -> np.ndarray:
        v = np.zeros(len(names))
        for item in hist[(user, service)]:
            v[names.index(department[(service, item)])] += 1
        return v / np.linalg.norm(v)

    mix_a = np.stack([mix(u, a) for u in users])  # (U, C)
    mix_b = np.stack([mix(u, b) for u in users])  # (U, C)
    same = float(np.mean(np.sum(mix_a * mix_b, axis=1)))
    other = float(np.mean(np.sum(mix_a * np.roll(mix_b, 1, axis=0), axis=1)))
    return same, other, len(users)
