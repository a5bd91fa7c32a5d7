"""Benchmark the item-level path against the token-level path it replaces, in one run.

Both models are built at the same size (``--size``, the same decoder and experts) over the same
catalogue and the same user histories; only what the issue changes differs:

* **token** (the old path): an event is ``[service][c1..cL][dedup]`` tokens with short residual IDs
  (``--token-levels`` codes of 256), trained on next-token cross-entropy, ranked by constrained
  beam search (``eval.beam_width`` beams, :func:`moe_rec.eval.evaluate.rank_requests`);
* **item** (the new default): one position per event with long IDs (``--item-levels`` codes of
  256), trained on the item softmax with ``--negatives`` sampled items and the per-item term,
  ranked by exact scoring of every item of the asked service (:func:`moe_rec.eval.exact.rank_exact`).

Measured (median over ``--iters``, after a warm-up): training events per second (forward,
backward and an AdamW step on ``--batch`` histories), evaluation requests per second (batches of
``--eval-batch``, top 20 of the full catalogue), and the latency of one request (batch of one, the
serving case). The ratio column is item / token. Random codes stand in for learned ones: speed does
not depend on which codes an item has.

    OMP_NUM_THREADS=1 python tools/bench_paths.py --items 10000 --history 20 --iters 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from moe_rec.data.positions import code_token_ranges
from moe_rec.data.sequences import Event, SequenceBuilder, SequenceConfig
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.evaluate import rank_requests
from moe_rec.eval.exact import ServiceCatalogue, rank_exact
from moe_rec.model import build_config, model_class
from moe_rec.sid.table import SIDTable
from moe_rec.train.data import Collator, ItemCollator

SERVICES = ("grocery", "marketplace", "delivery")
CODEBOOK = 256


def timed(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_table(items_per_service: int, levels: int, seed: int) -> SIDTable:
    """A catalogue of ``items_per_service`` items per service with random ``levels``-code IDs."""
    g = torch.Generator().manual_seed(seed)
    n = items_per_service * len(SERVICES)
    return SIDTable.from_quantized(
        services=[s for s in SERVICES for _ in range(items_per_service)],
        item_ids=[f"i{j}" for _ in SERVICES for j in range(items_per_service)],
        codes=torch.randint(CODEBOOK, (n, levels), generator=g),
        codebook_size=CODEBOOK,
        max_dedup=CODEBOOK,
    )


def histories(num_users: int, length: int, items_per_service: int, seed: int) -> list[list[Event]]:
    """Each user's ``length`` training events (random services and items), then a test event."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_users):
        services = torch.randint(len(SERVICES), (length + 1,), generator=g).tolist()
        items = torch.randint(items_per_service, (length + 1,), generator=g).tolist()
        out.append(
            [
                Event(SERVICES[s], f"i{i}", t, t, "test" if t == length else "train")
                for t, (s, i) in enumerate(zip(services, items))
            ]
        )
    return out


class Contender:
    """One path: its table, model, training batch and evaluation requests."""

    def __init__(self, kind: str, levels: int, args: argparse.Namespace, users: list[list[Event]]) -> None:
        self.kind = kind
        self.table = random_table(args.items, levels, seed=1)
        vocab = self.table.vocabulary()
        builder = SequenceBuilder(vocab, self.table.code_map(), SequenceConfig(max_events=args.history))
        train = [s for u, events in enumerate(users) for s in builder.train_samples(f"u{u}", events)]
        self.requests = [
            s for u, events in enumerate(users) for s in builder.eval_samples(f"u{u}", events, "test")
        ]
        fields = dict(vocab_size=vocab.size, num_domains=vocab.service_slots, router_mode=args.router_mode)
        if kind == "item":
            fields |= dict(
                code_token_ranges=code_token_ranges(vocab),
                item_loss="items",
                item_negatives=args.negatives,
                item_embedding=True,
                num_items=len(self.table),
            )
        config = build_config(args.size, **fields)
        torch.manual_seed(0)
        self.model = model_class(config)(config)
        if kind == "item":
            self.model.set_train_catalogue(self.table.codes, self.table.service_index + vocab.service_offset)
            self.collate = ItemCollator(vocab, config.num_user_buckets)
            self.catalogue = ServiceCatalogue(self.table)
        else:
            self.collate = Collator(config.num_user_buckets)
            self.trie = self.table.trie()
        self.batch = self.collate(train[: args.batch])
        self.events = sum(len(events) - 1 for events in users[: args.batch])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.eval_cfg = EvalConfig(beam_width=20, batch_size=args.eval_batch)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def rank(self, rows: list[dict]) -> None:
        self.model.eval()
        if self.kind == "item":
            rank_exact(self.model, self.catalogue, rows, 20)
        else:
            rank_requests(self.model, self.table, self.trie, rows, self.eval_cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000, help="items per service (3 services)")
    parser.add_argument("--history", type=int, default=20, help="events per user history")
    parser.add_argument("--users", type=int, default=256, help="users (training batch and requests)")
    parser.add_argument("--batch", type=int, default=32, help="histories per training step")
    parser.add_argument("--eval-batch", type=int, default=64, help="requests per evaluation batch")
    parser.add_argument("--size", default="tiny", help="model size of both paths (model.size)")
    parser.add_argument("--router-mode", default="domain_user")
    parser.add_argument("--token-levels", type=int, default=3, help="residual codes per item, token path")
    parser.add_argument("--item-levels", type=int, default=16, help="OPQ codes per item, item path")
    parser.add_argument("--negatives", type=int, default=2048, help="sampled items per step, item path")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    users = histories(args.users, args.history, args.items, seed=0)
    paths = {
        "token": Contender("token", args.token_levels, args, users),
        "item": Contender("item", args.item_levels, args, users),
    }
    results: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        requests = path.requests[: args.eval_batch]
        results[name] = {
            "train events/s": path.events / timed(path.train_step, args.iters),
            "eval requests/s": len(requests) / timed(lambda p=path, r=requests: p.rank(r), args.iters),
            "recommend ms": 1000 * timed(lambda p=path, r=requests[:1]: p.rank(r), args.iters),
        }
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; size {args.size}, {args.items:,} items x {len(SERVICES)} services, "
        f"histories of {args.history}, token IDs {args.token_levels} codes, item IDs {args.item_levels} codes"
    )
    print(f"{'measure':<18}{'token':>12}{'item':>12}{'item/token':>12}")
    for measure in results["token"]:
        token, item = results["token"][measure], results["item"][measure]
        print(f"{measure:<18}{token:>12.1f}{item:>12.1f}{item / token:>12.2f}")


if __name__ == "__main__":
    main()
