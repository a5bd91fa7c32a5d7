"""How much of its own service's history does a joint model's request see? Per service, the
evaluation requests whose context holds fewer of the asked service's events than a model of that
service alone would see (its history before the target, capped at ``max_events``), and how many
events they miss.

A joint context shares its ``sequences.max_events`` among the user's services: interleaved by
progress (``sequences.order: interleave``) a user of several services can lose their own latest
events to the other services'; ``asked_last`` keeps them first (docs/data.md).

    python tools/context_share.py runs/bench-gpu/joint     # interleaved: 970 requests miss 8,102 events
    python tools/context_share.py runs/joint-asked         # asked_last: none

Reads ``run_dir/sequences/<split>`` (its samples), ``run_dir/sequences/vocab.json`` and
``run_dir/data/events`` (the histories); the cap comes from ``--max-events`` (default 50, the
benchmark's).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow.dataset as ds

from moe_rec.data.vocab import Vocabulary

HELD_OUT_BEFORE = {"test": ("train", "valid"), "valid": ("train",)}  # what precedes a target of the split


def own_history(events: Iterable[Mapping[str, str]], split: str) -> Counter[tuple[str, str]]:
    """(user, service) -> the events a one-service model's ``split`` context is drawn from."""
    before = HELD_OUT_BEFORE[split]
    return Counter((e["user"], e["service"]) for e in events if e["split"] in before)


def own_in_context(domain_ids: list[int], service: str, vocab: Vocabulary) -> int:
    """The asked service's events in a request (``[BOS]``, whole events, the asked service's token)."""
    asked = vocab.service_index(service)
    return sum(1 for k in range(1, len(domain_ids) - 1, vocab.tokens_per_item) if domain_ids[k] == asked)


def missing(
    requests: Iterable[Mapping], history: Counter[tuple[str, str]], vocab: Vocabulary, max_events: int
) -> dict[str, tuple[int, int, int]]:
    """service -> (requests, requests that miss some of their service's events, events missed)."""
    out: dict[str, list[int]] = {}
    for r in requests:
        row = out.setdefault(r["service"], [0, 0, 0])
        lost = min(history[(r["user"], r["service"])], max_events) - own_in_context(
            r["domain_ids"], r["service"], vocab
        )
        row[0] += 1
        if lost > 0:
            row[1] += 1
            row[2] += lost
    return {s: (n, m, lost) for s, (n, m, lost) in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with sequences/ and data/")
    parser.add_argument("--split", choices=sorted(HELD_OUT_BEFORE), default="test")
    parser.add_argument("--max-events", type=int, default=50, help="the history cap (sequences.max_events)")
    args = parser.parse_args()
    run = args.run_dir
    for path in (run / "sequences" / args.split, run / "sequences" / "vocab.json", run / "data" / "events"):
        if not path.exists():
            parser.error(f"{path} is missing: pass a run directory after `moe-rec sequences build`")
    vocab = Vocabulary.from_dict(json.loads((run / "sequences" / "vocab.json").read_text()))
    events = ds.dataset(run / "data" / "events").to_table(columns=["user", "service", "split"]).to_pylist()
    requests = ds.dataset(run / "sequences" / args.split).to_table(columns=["user", "service", "domain_ids"])
    found = missing(requests.to_pylist(), own_history(events, args.split), vocab, args.max_events)
    print(
        f"{args.split} requests that see fewer of their service's events than a one-service model (cap {args.max_events}):"
    )
    for service, (n, m, lost) in found.items():
        print(f"  {service:<10} {m:,} of {n:,} requests, {lost:,} events")
    total = [sum(v[i] for v in found.values()) for i in range(3)]
    print(f"  {'all':<10} {total[1]:,} of {total[0]:,} requests, {total[2]:,} events")


if __name__ == "__main__":
    main()
