"""How much a critique gives its target away, for several settings of the leakage guard.

For each ``(min_matching_items, max_terms)`` it builds the critiques of a prepared data directory
into a scratch folder and prints, per service, the test rows kept, the share naming terms, and the
BM25 retrieval leakage of the critique alone (top-1 / top-10), beside the same retrieval with the
previous item's title (the reference measured in the same run) and chance. The numbers in
``docs/critiques.md`` come from::

    python tools/critique_leakage.py --data runs/amazon2014/data --services beauty sports toys \\
        --min-matching 5 10 20 50 --max-terms 1 2

Items without categories are compared by the default text encoder (cached embeddings: see
``moe_rec/sid/embed.py``; ``--cache`` sets where).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.critiques import build_critiques
from moe_rec.sid.embed import TextEncoder
from moe_rec.sid.item_text import item_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared data directory (<run_dir>/data)")
    parser.add_argument("--services", nargs="+", help="services to build (default: all)")
    parser.add_argument("--min-matching", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--max-terms", nargs="+", type=int, default=[1, 2])
    root = Path(os.environ.get("MOE_REC_CACHE") or Path.home() / ".cache" / "moe_rec")
    parser.add_argument("--cache", type=Path, default=root / "embeddings", help="embedding cache")
    args = parser.parse_args()
    encoder = TextEncoder("default", cache_dir=args.cache)

    def embed(rows: pa.Table) -> np.ndarray:
        return encoder.encode(item_texts(rows)).numpy()

    print(
        "service  min_match  max_terms  test_rows  names_terms  critique top1/top10  previous top1/top10  chance top10"
    )
    for max_terms in args.max_terms:
        for min_matching in args.min_matching:
            cfg = CritiqueConfig(
                services=args.services, min_matching_items=min_matching, max_terms=max_terms, leakage_sample=1
            )
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                stats = build_critiques(Path(args.data), Path(out), cfg, embed)
                test = pq.read_table(Path(out) / "test.parquet", columns=["service", "types"]).to_pylist()
            for scope, m in stats["leakage"]["test"].items():
                rows = [r for r in test if scope in ("all", r["service"])]
                terms = sum("terms" in r["types"] for r in rows) / max(len(rows), 1)
                print(
                    f"{scope:8} {min_matching:9} {max_terms:10} {len(rows):10,} {terms:12.3f}  "
                    f"{m['critique_top1']:.4f} / {m['critique_top10']:.4f}    "
                    f"{m['previous_top1']:.4f} / {m['previous_top10']:.4f}      {m['chance_top10']:.5f}",
                    flush=True,
                )
            print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
