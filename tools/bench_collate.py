"""Benchmark the item-level collator: Arrow columns at once against one row at a time.

Both collate the same length-grouped micro batches of a run's train split (the first epoch's plan
of :class:`moe_rec.train.data.ShardedTrainData`, as training makes them): the columnar path of
:class:`moe_rec.train.data.ItemCollator` (:func:`moe_rec.data.positions.columnar_item_batch`) and
the row-by-row reference (:func:`moe_rec.data.positions.item_batch` on decoded rows). It checks
that every batch is identical, then prints the milliseconds per micro batch of each and the ratio
(the reference is the baseline, measured in the same run, alternating).

    python tools/bench_collate.py --sequences runs/amazon2014-joint/sequences
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_rec.data.positions import item_batch
from moe_rec.data.vocab import Vocabulary
from moe_rec.train.data import ItemCollator, ShardedTrainData, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sequences", required=True, type=Path, help="a run's sequences/ directory")
    parser.add_argument(
        "--tokens", type=int, default=2048, help="positions per micro batch (micro_batch_tokens)"
    )
    parser.add_argument("--batches", type=int, default=60, help="micro batches timed per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab_path = args.sequences / "vocab.json"
    if not vocab_path.exists():
        parser.error(f"{vocab_path} not found: --sequences must be a run's sequences/ directory")
    vocab = Vocabulary.from_dict(json.loads(vocab_path.read_text()))
    ds = load_split(args.sequences, "train")
    collator = ItemCollator(vocab, 1024)
    data = ShardedTrainData(ds, micro_batch_size=1, micro_batch_tokens=args.tokens, grad_accum=1, rank=0,
                            world_size=1, seed=0, collator=collator,
                            positions_per_sample=ShardedTrainData.item_positions(ds, vocab))  # fmt: skip
    plan = [ds.select(b.tolist()) for b in data.plan(0)[: args.batches]]
    timed = {"columnar": 0.0, "row by row": 0.0}
    decoding = 0.0  # of the row-by-row time: turning the selection's rows into Python dicts
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        fast = [collator(rows) for rows in plan]
        t1 = time.perf_counter()
        decoded = [list(rows) for rows in plan]
        t2 = time.perf_counter()
        slow = [item_batch(rows, vocab, 1024) for rows in decoded]
        timed["columnar"] += t1 - t0
        timed["row by row"] += time.perf_counter() - t1
        decoding += t2 - t1
        if not all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b) for a, b in zip(fast, slow)
        ):
            raise SystemExit("the two paths made different batches")
    per = {k: v / (args.rounds * len(plan)) * 1e3 for k, v in timed.items()}
    positions = sum(int(b["attention_mask"].sum()) for b in fast) / len(fast)
    print(f"{len(plan)} micro batches of <= {args.tokens} positions ({positions:,.0f} real on average), "
          f"{args.rounds} rounds, identical batches")  # fmt: skip
    for name, ms in per.items():
        print(f"  {name:>10}: {ms:6.1f} ms a micro batch")
    share = decoding / timed["row by row"]
    print(f"  (row by row: {share:.0%} decoding the rows into Python lists, the rest walking them)")
    print(f"  ratio: columnar is {per['row by row'] / per['columnar']:.1f}x the row-by-row collator")


if __name__ == "__main__":
    main()
