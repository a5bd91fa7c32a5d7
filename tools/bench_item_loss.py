"""Benchmark one training step's item softmax on the joint recipe's shapes: how the drawn copies of
each target are found among the sampled candidates, and the candidates' score gather forward and
backward.

The item loss (``item_loss: items``, ``item_negatives``) scores every position's target once, in
front of its service's drawn candidates, and drops a drawn copy of the target. Finding the copies:

* **ours** — :func:`moe_rec.model.item_model.same_codes`: positions and candidates compared on the
  first code, then the pairs that agree (about one in K) on the rest;
* **plain** (the baseline) — ``(targets[:, None] == codes[None]).all(-1)``, an (M, C, P) comparison.

Both must give the same mask (checked). The gather (:func:`~moe_rec.model.item_model.gather_scores`,
P+1 = 17 code positions with the dedup code) forward and backward: **ours**, its own backward (one
zero tensor, index-added per code position), against **plain**, autograd through the loop
(``gather_scores_reference``), which zeroes the whole (P, K, M) table once per code position; the
gradients must agree (checked). It prints the median time of each over the iterations and plain /
ours.

    OMP_NUM_THREADS=1 python tools/bench_item_loss.py                       # the joint recipe's shapes
    OMP_NUM_THREADS=1 python tools/bench_item_loss.py --positions 700 --candidates 1900 --codes 16
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_paths import timed  # tools/ is on the path of a script run from it

from moe_rec.model.item_model import gather_scores, gather_scores_reference, same_codes


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
    t_plain, t_ours = timed(plain, args.iters), timed(ours, args.iters)

    table = torch.randn(p + 1, k, m, generator=g, requires_grad=True)  # + the dedup code
    ids = torch.cat([codes, torch.randint(k, (c, 1), generator=g)], 1)
    upstream = torch.randn(c, m, generator=g)

    def gather_backward(gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        (grad,) = torch.autograd.grad((gather(table, ids) * upstream).sum(), table)
        return grad

    if not torch.allclose(
        gather_backward(gather_scores), gather_backward(gather_scores_reference), atol=1e-4
    ):
        raise SystemExit("gather_scores' backward and autograd of the loop disagree")
    t_loop = timed(lambda: gather_backward(gather_scores_reference), args.iters)
    t_fast = timed(lambda: gather_backward(gather_scores), args.iters)
    print(f"M={m} positions x C={c} candidates, P={p} codes of K={k}; {torch.get_num_threads()} thread(s)")
    print(f"plain (M, C, P) comparison             {t_plain * 1e3:8.2f} ms")
    print(f"ours (same_codes)                      {t_ours * 1e3:8.2f} ms")
    print(f"plain / ours: {t_plain / t_ours:.1f}x")
    print(f"score gather + backward, plain autograd {t_loop * 1e3:8.2f} ms")
    print(f"score gather + backward, ours           {t_fast * 1e3:8.2f} ms")
    print(f"plain / ours: {t_loop / t_fast:.1f}x")


if __name__ == "__main__":
    main()
