"""Benchmark training throughput: fixed-size micro batches of random windows vs length-grouped ones.

Both plans come from :class:`moe_rec.train.data.ShardedTrainData` over the same train split, with
the same collator, model and optimizer. For each it prints the share of padded positions that are
real tokens and the real (non-padding) tokens per second of forward + backward + AdamW, timed
over the same number of randomly chosen micro batches of the first epoch's plan, and the ratio of
the grouped plan's tokens/s to the fixed plan's (the baseline, measured in the same run).

    python tools/bench_train_batches.py --sequences runs/amazon2014/sequences --threads 1
    python tools/bench_train_batches.py --sequences runs/demo/sequences --size tiny --tokens 512 2048
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moe_rec.data.vocab import Vocabulary
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.model.choices import MODEL_SIZES
from moe_rec.train.data import Collator, ShardedTrainData, load_split


def measure(
    data: ShardedTrainData, model: MoERecForCausalLM, batches: int, warmup: int, seed: int
) -> tuple[float, float]:
    """(real tokens / padded positions over the whole plan, real tokens/s of training steps)."""
    plan = data.plan(0)
    real = sum(int(data.lengths[b].sum()) for b in plan)
    padded = sum(len(b) * int(data.lengths[b].max()) for b in plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    chosen = np.random.default_rng(seed).choice(
        len(plan), size=min(warmup + batches, len(plan)), replace=False
    )
    tokens, elapsed = 0, 0.0
    for i, b in enumerate(chosen):
        batch = data.collator(data.dataset.select(plan[b].tolist()))
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            elapsed += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
    return real / padded, tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sequences", required=True, type=Path, help="a run's sequences/ directory")
    parser.add_argument("--size", default="tiny", choices=MODEL_SIZES)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per fixed-size micro batch")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="micro_batch_tokens")
    parser.add_argument("--batches", type=int, default=40, help="timed micro batches per plan")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = Vocabulary.from_dict(json.loads((args.sequences / "vocab.json").read_text()))
    dataset = load_split(args.sequences, "train")
    config = build_config(args.size, vocab_size=vocab.size, num_domains=vocab.service_slots)
    lengths = ShardedTrainData.token_lengths(dataset)
    print(f"{len(dataset):,} windows, tokens per window: median {np.median(lengths):.0f}, "
          f"mean {lengths.mean():.1f}, max {lengths.max()}; model {args.size}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'plan':<28} {'micro batches':>13} {'real/padded':>11} {'real tok/s':>11} {'ratio':>6}")
    baseline = None
    for tokens in [0, *args.tokens]:
        torch.manual_seed(args.seed)
        model = MoERecForCausalLM(config).train()
        data = ShardedTrainData(dataset, micro_batch_size=args.batch_size, micro_batch_tokens=tokens, grad_accum=1,
                                rank=0, world_size=1, seed=args.seed, collator=Collator(config.num_user_buckets))  # fmt: skip
        share, tok_s = measure(data, model, args.batches, args.warmup, args.seed)
        baseline = baseline or tok_s
        name = f"<= {tokens} tokens, by length" if tokens else f"{args.batch_size} random windows"
        print(f"{name:<28} {len(data.plan(0)):>13,} {share:>11.3f} {tok_s:>11,.0f} {tok_s / baseline:>5.2f}x")


if __name__ == "__main__":
    main()
