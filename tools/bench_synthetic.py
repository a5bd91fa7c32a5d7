"""Benchmark the synthetic generator: throughput, wall time, peak memory and where the time goes.

Generates about ``--events`` events (``num_users = events / mean_events_per_user``) into a
temporary directory (deleted afterwards unless ``--out`` is given) and prints events/s, wall time,
peak RSS (before and after generating, so the growth is visible), the shard count and size, and
the time split between simulating (numpy), ``order_and_split`` + Arrow, and writing Parquet: the
Parquet write is the floor the rest is compared against, measured in the same run.

    python tools/bench_synthetic.py --events 10000000
    python tools/bench_synthetic.py --events 1000000 --users-per-shard 5000 --out /tmp/syn
    python tools/bench_synthetic.py --events 60000 --structure    # also measure the planted structure
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from moe_rec.data import store, structure
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.sources import synthetic


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(fn: Callable[..., Any], seconds: dict[str, float], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="about this many events (default 1M)")
    defaults = SyntheticConfig()
    parser.add_argument("--users-per-shard", type=int, default=defaults.users_per_shard)
    parser.add_argument("--items-per-service", type=int, default=defaults.items_per_service)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the output here (default: deleted)")
    parser.add_argument(
        "--structure", action="store_true", help="also print the planted structure (moe_rec.data.structure)"
    )
    args = parser.parse_args()

    datasets.disable_progress_bars()  # one bar per shard from datasets would drown the output
    num_users = math.ceil(args.events / defaults.mean_events_per_user)
    cfg = DataConfig(
        synthetic=SyntheticConfig(
            num_users=num_users,
            items_per_service=args.items_per_service,
            users_per_shard=args.users_per_shard,
            seed=args.seed,
        )
    )
    seconds: dict[str, float] = defaultdict(float)
    synthetic.simulate_block = _timed(synthetic.simulate_block, seconds, "simulate (numpy)")
    synthetic.block_table = _timed(synthetic.block_table, seconds, "order_and_split + Arrow")
    store.write_shard = _timed(store.write_shard, seconds, "write Parquet (floor)")

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_synthetic_"))
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    try:
        events_report, items_report = synthetic.write(cfg, out)
        wall = time.perf_counter() - start
        shards = sorted((out / store.EVENTS_DIR).glob("*.parquet"))
        size_mib = sum(p.stat().st_size for p in shards) / 2**20
        measured = _structure(out) if args.structure else []
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    events = events_report.rows_kept
    print(f"users           {num_users:,} ({args.users_per_shard:,} per shard)")
    print(f"events          {events:,}   items {items_report.rows_kept:,}")
    print(f"wall time       {wall:.1f} s")
    print(f"throughput      {events / wall:,.0f} events/s")
    for name, s in seconds.items():
        print(f"  {name:<24}{s:7.1f} s  ({100 * s / wall:.0f}%)")
    per_shard = size_mib / max(len(shards), 1)
    print(f"shards          {len(shards)}   {size_mib:.0f} MiB on disk ({per_shard:.1f} MiB per shard)")
    print(f"peak RSS        {_peak_rss_mib():.0f} MiB (after imports: {rss_before:.0f} MiB)")
    print(f"notes           {dict(events_report.notes)}")
    print(f"output          {out}" + ("" if args.out else " (deleted)"))
    for line in measured:
        print(line)


def _structure(out: Path) -> list[str]:
    """The planted structure of the generated data, measured (lines to print)."""
    events, items = store.load_table(out, store.EVENTS_DIR), store.load_table(out, store.ITEMS_DIR)
    hist = structure.histories(events)
    lines = [
        "repeat rate     "
        + ", ".join(f"{s} {structure.repeat_rate(hist, s):.3f}" for s in synthetic.SERVICES)
    ]
    spread = structure.services_per_user(events)
    users = sum(spread.values())
    lines.append("services/user   " + ", ".join(f"{k}: {v / users:.1%}" for k, v in sorted(spread.items())))
    top10, top1 = structure.top_shares(events)
    lines.append(f"popularity      top 10% of items {top10:.1%} of events, top 1% {top1:.1%}")
    for a, b in (("grocery", "marketplace"), ("grocery", "delivery"), ("marketplace", "delivery")):
        same, other, n = structure.taste_similarity(events, items, a, b)
        lines.append(f"taste {a}~{b}: same user {same:.3f}, other user {other:.3f} ({n:,} users)")
    return lines


if __name__ == "__main__":
    main()
