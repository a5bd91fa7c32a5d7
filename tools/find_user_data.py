"""Which files of a run directory hold raw user ids: every user id of the prepared events
searched in every file (raw bytes, Parquet also decoded), one line per file that holds any.

    python tools/find_user_data.py runs/demo                    # ids of runs/demo/data/events
    python tools/find_user_data.py runs/demo/bundle --data runs/demo/data

It finds ids written as text (JSON, logs, Parquet columns, pickled strings); what a model learned
from a user is in its weights, which no search finds: that is what ``moe-rec audit`` measures
(docs/privacy.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_rec.data import store
from moe_rec.data.forget import find_strings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a run directory, a bundle, or any directory")
    parser.add_argument("--data", help="prepared data directory whose users to look for (default: ROOT/data)")
    args = parser.parse_args()
    root = Path(args.root)
    data = Path(args.data) if args.data else root / "data"
    t0 = time.perf_counter()
    users: set[str] = set()
    for shard in store.event_shard_paths(data):
        users.update(pc.unique(pq.read_table(shard, columns=["user"])["user"]).to_pylist())
    found = find_strings(root, users)
    files = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 1
    for path, ids in sorted(found.items()):
        print(f"{path}: {len(ids):,} of {len(users):,} user ids")
    print(f"{len(found)} of {files} files under {root} hold a raw user id ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
