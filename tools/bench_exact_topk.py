"""Benchmark exact full-catalogue top-k for the item-level model at 10k / 100k / 1M items.

Given per-code log-probabilities ``(B, P, K)`` (what the model's heads give for a batch of
requests) and a catalogue of N items with P codes each, both paths return the exact top k:

* **ours** — :func:`moe_rec.eval.exact.top_items`: per code position, one gather-add of a
  ``(B, chunk)`` score block, and a running top-k merged chunk by chunk, so memory is bounded by
  one block however large N is;
* **plain** (the baseline) — the straightforward expression: gather every item's P log-probs at
  once, ``log_probs[:, arange(P), codes]`` -> (B, N, P), sum, ``torch.topk`` over all N.

It checks that both return the same items (scores equal to float tolerance; ties are broken by
item index in ours, arbitrarily by topk, so items are compared where scores differ), then prints
the time per batch of each (median over the iterations), requests/s, and ours / plain.

    python tools/bench_exact_topk.py --items 10000 100000 1000000 --batch 64 --codes 17 --iters 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from moe_rec.eval.exact import top_items


def plain_top_k(log_probs: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All scores at once, then one top-k: (B, N, P) memory."""
    positions = torch.arange(codes.shape[1], device=codes.device)
    scores = log_probs[:, positions, codes].sum(-1)  # (B, N, P) -> (B, N)
    return torch.topk(scores, k, dim=1)


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=64, help="requests scored together")
    parser.add_argument("--codes", type=int, default=17, help="P: code positions per item (16 OPQ + dedup)")
    parser.add_argument("--codebook", type=int, default=256, help="K: codes per position")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=65_536, help="items per block in ours")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads "
          f"{torch.get_num_threads()}, device {device}; B={args.batch}, P={args.codes}, K={args.codebook}, "
          f"k={args.k}")  # fmt: skip
    print("| items | ours ms / batch | plain ms / batch | ours requests/s | ours / plain time | same top-k |")
    print("|---|---|---|---|---|---|")
    for n in args.items:
        log_probs = torch.log_softmax(torch.randn(args.batch, args.codes, args.codebook, generator=g), -1).to(
            device
        )
        codes = torch.randint(args.codebook, (n, args.codes), generator=g).to(device)
        ours_s, ours_i = top_items(log_probs, codes, args.k, chunk_items=args.chunk)
        plain_s, plain_i = plain_top_k(log_probs, codes, args.k)
        same = torch.allclose(ours_s, plain_s, atol=1e-4) and bool(
            ((ours_i == plain_i) | torch.isclose(ours_s, plain_s, atol=1e-4)).all()
        )
        t_ours = timed(
            partial(top_items, log_probs, codes, args.k, chunk_items=args.chunk), args.iters, device
        )
        t_plain = timed(partial(plain_top_k, log_probs, codes, args.k), args.iters, device)
        print(f"| {n:,} | {t_ours * 1e3:.1f} | {t_plain * 1e3:.1f} | {args.batch / t_ours:,.0f} | "
              f"{t_ours / t_plain:.2f} | {same} |")  # fmt: skip


if __name__ == "__main__":
    main()
