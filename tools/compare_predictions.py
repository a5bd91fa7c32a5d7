"""Where does one model win or lose against another? Two runs' saved test predictions, each
request's NDCG@k, grouped by what its user and target are like.

`moe-rec eval --save-predictions F` writes every request's ranked items (JSONL: request, user,
service, target, ranked). This reads those of two models of the same split (model A, model B;
each one file or several, e.g. one per per-service model) and the
prepared events table (`run_dir/data/events`), matches the requests by (user, service, target),
and prints per service, for each grouping, each group's request count, A's and B's NDCG@k and A's
change against B:

* the services the user has events in (1, 2, 3, ...): what a joint model does with users of
  several services, whose histories it sees together;
* the target item's training events in its service (0-4, 5-19, 20-99, 100+): head or tail;
* the user's events in the target's service before the held-out ones (1-4, 5-9, 10+).

    python tools/compare_predictions.py --events runs/bench-gpu/joint/data/events \\
        --a runs/joint-prior/test-predictions.jsonl --b runs/preds/{beauty,sports,toys}.jsonl

Requests in only one file are counted and left out of the groups, never silently.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow.parquet as pq

Key = tuple[str, str, str]  # (user, service, target item)


def ndcg_at(ranked: list[str], target: str, k: int) -> float:
    """1 / log2(rank + 1) when ``target`` is among the first ``k`` of ``ranked``, else 0."""
    top = ranked[:k]
    return 1.0 / math.log2(top.index(target) + 2) if target in top else 0.0


def read_predictions(path: Path, k: int) -> dict[Key, float]:
    """{(user, service, target): NDCG@k} of a `--save-predictions` file; a malformed line is an error
    naming the file and line."""
    out: dict[Key, float] = {}
    with path.open() as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                key = (str(row["user"]), str(row["service"]), str(row["target"]))
                out[key] = ndcg_at([str(x) for x in row["ranked"]], key[2], k)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"error: {path}:{number}: not a prediction row ({e})") from None
    return out


def popularity_group(count: int) -> str:
    return "0-4" if count < 5 else "5-19" if count < 20 else "20-99" if count < 100 else "100+"


def history_group(count: int) -> str:
    return "1-4" if count < 5 else "5-9" if count < 10 else "10+"


def groupings(events: Iterable[dict]) -> dict[str, Callable[[Key], str]]:
    """{grouping name: request key -> its group}, from the events table's rows (user, service,
    item_id, split)."""
    popularity: Counter[tuple[str, str]] = Counter()
    history: Counter[tuple[str, str]] = Counter()
    services: defaultdict[str, set[str]] = defaultdict(set)
    for e in events:
        services[e["user"]].add(e["service"])
        if e["split"] == "train":
            popularity[(e["service"], e["item_id"])] += 1
            history[(e["user"], e["service"])] += 1
    return {
        "services of the user": lambda key: str(len(services[key[0]])),
        "target's training events": lambda key: popularity_group(popularity[(key[1], key[2])]),
        "user's training events in the service": lambda key: history_group(history[(key[0], key[1])]),
    }


def _group_order(item: tuple[str, object]) -> tuple[int, str]:
    """Groups named by a number or a range ("5-19", "100+") in numeric order."""
    digits = re.match(r"\d+", item[0])
    return (int(digits.group()) if digits else -1, item[0])


def compare(
    a: dict[Key, float], b: dict[Key, float], group_of: Callable[[Key], str]
) -> dict[str, dict[str, tuple[int, float, float]]]:
    """{service: {group: (requests, mean NDCG of A, mean NDCG of B)}} over the requests in both."""
    sums: defaultdict[str, defaultdict[str, list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0.0, 0.0])
    )
    for key in a.keys() & b.keys():
        cell = sums[key[1]][group_of(key)]
        cell[0] += 1
        cell[1] += a[key]
        cell[2] += b[key]
    return {
        service: {g: (int(n), sa / n, sb / n) for g, (n, sa, sb) in sorted(groups.items(), key=_group_order)}
        for service, groups in sorted(sums.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--a", type=Path, nargs="+", required=True, help="model A's --save-predictions file(s)"
    )
    parser.add_argument("--b", type=Path, nargs="+", required=True,
                        help="model B's --save-predictions file(s): the reference")  # fmt: skip
    parser.add_argument(
        "--events", type=Path, required=True, help="the prepared events (run_dir/data/events)"
    )
    parser.add_argument("--k", type=int, default=10, help="NDCG cut-off (default 10)")
    args = parser.parse_args()
    for path in (*args.a, *args.b, args.events):
        if not path.exists():
            raise SystemExit(f"error: {path} not found")
    a = {key: v for path in args.a for key, v in read_predictions(path, args.k).items()}
    b = {key: v for path in args.b for key, v in read_predictions(path, args.k).items()}
    table = pq.read_table(args.events, columns=["user", "service", "item_id", "split"]).to_pylist()
    print(f"A: {len(a):,} requests; B: {len(b):,}; in both {len(a.keys() & b.keys()):,} "
          f"(only in A {len(a.keys() - b.keys()):,}, only in B {len(b.keys() - a.keys()):,}, left out)")  # fmt: skip
    for name, group_of in groupings(table).items():
        print(f"\n{name}: requests, NDCG@{args.k} of A / B (A's change)")
        for service, groups in compare(a, b, group_of).items():
            cells = [
                f"{g}: {n:,} {sa:.4f} / {sb:.4f} ({(sa / sb - 1) * 100:+.0f} %)"
                if sb
                else f"{g}: {n:,} {sa:.4f} / 0"
                for g, (n, sa, sb) in groups.items()
            ]
            print(f"  {service:<10} " + "   ".join(cells))


if __name__ == "__main__":
    main()
