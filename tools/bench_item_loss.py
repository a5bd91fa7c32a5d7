"""Benchmark one training step's item softmax on the joint recipe's shapes: how the drawn copies of
each target are found among the sampled candidates.

The item loss (``item_loss: items``, ``item_negatives``) scores every position's target once, in
front of its service's drawn candidates, and drops a drawn copy of the target. Finding the copies:

* **ours** — :func:`moe_rec.model.item_model.same_codes`: positions and candidates compared on the
  first code, then the pairs that agree (about one in K) on the rest;
* **plain** (the baseline) — ``(targets[:, None] == codes[None]).all(-1)``, an (M, C, P) comparison.

Both must give the same mask (checked); it prints the median time of each over the iterations, that
of the score gather over the same shapes for scale, and plain / ours.

    OMP_NUM_THREADS=1 python tools/bench_item_loss.py                       # the joint recipe's shapes
    OMP_NUM_THREADS=1 python tools/bench_item_loss.py --positions 700 --candidates 1900 --codes 16
"""

from __future__ import annotations

import argparse

import torch
from bench_paths import timed  # tools/ is on the path of a script run from it

from moe_rec.model.item_model import gather_scores, same_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # a micro batch of the joint recipe: 2,048 positions over three services, 2,048 draws a service
    parser.add_argument("--positions", type=int, default=700, help="positions asking for one service (M)")
    parser.add_argument("--candidates", type=int, default=1900, help="distinct drawn items of it (C)")
    parser.add_argument("--codes", type=int, default=16, help="codes per item (P)")
    parser.add_argument("--codebook", type=int, default=256, help="values per code (K)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    m, c, p, k = args.positions, args.candidates, args.codes, args.codebook
    codes = torch.randint(k, (c, p), generator=g)
    targets = torch.randint(k, (m, p), generator=g)
    targets[: m // 10] = codes[torch.randint(c, (m // 10,), generator=g)]  # some targets were drawn too

    def plain() -> torch.Tensor:
        return (targets[:, None] == codes[None]).all(-1)

    def ours() -> torch.Tensor:
        return same_codes(targets, codes)

    if not torch.equal(plain(), ours()):
        raise SystemExit("same_codes and the plain comparison disagree")
    by_code = torch.randn(p, k, m, generator=g)
    t_plain, t_ours = timed(plain, args.iters), timed(ours, args.iters)
    t_gather = timed(lambda: gather_scores(by_code, codes), args.iters)
    print(f"M={m} positions x C={c} candidates, P={p} codes of K={k}; {torch.get_num_threads()} thread(s)")
    print(f"plain (M, C, P) comparison   {t_plain * 1e3:8.2f} ms")
    print(f"ours (same_codes)            {t_ours * 1e3:8.2f} ms")
    print(f"for scale: the score gather  {t_gather * 1e3:8.2f} ms")
    print(f"plain / ours: {t_plain / t_ours:.1f}x")


if __name__ == "__main__":
    main()
