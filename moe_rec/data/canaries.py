"""Planted canaries, for the exposure audit (:mod:`moe_rec.eval.privacy_audit`; Carlini et al.,
"The Secret Sharer", USENIX Security 2019).

A canary is a random pattern: ``context_items`` distinct items of one service followed by one more
item of it, the canary item. ``sequences.canaries.count: 8`` draws 8 such patterns to plant and 8
more, drawn the same way, as controls that are never planted. Each planted pattern becomes the
whole training history of ``copies`` synthetic users (keys starting with :data:`CANARY_PREFIX`),
written as training windows into ``<sequences>/train/part-canaries.parquet``; they never enter
``data/``, the evaluation splits or the held-out users. ``<sequences>/canaries.json`` records the
config and every pattern (planted and controls).

After training, the audit asks the model for the service's next item after each pattern's context
and ranks the pattern's item among all N items of the service: exposure = log2(N) - log2(rank).
A control's exposure is what chance gives (about 1.4 bits for a uniform rank); a planted canary's
is higher by what the model memorised of the ``copies`` histories it saw.

Patterns are drawn from the items that have a semantic ID and are not kept out of training by the
cold-start benchmark, by a ``random.Random(seed)``: the same config gives the same canaries.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_rec.data.schema import DataError

CANARY_FILE = "canaries.json"
CANARY_SHARD = "part-canaries.parquet"  # in <sequences>/train/
CANARY_PREFIX = "__canary__"  # user keys of the synthetic users that carry planted canaries


@dataclass
class CanaryConfig:
    count: int = 0  # patterns planted (and as many controls drawn, never planted); 0: none
    copies: int = 10  # synthetic users per planted pattern: how often training sees it
    context_items: int = 5  # items before the canary item
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 0 or self.copies < 1 or self.context_items < 1:
            raise ValueError("canaries: count >= 0, copies >= 1 and context_items >= 1 are required")


@dataclass(frozen=True)
class Canary:
    service: str
    context: tuple[str, ...]  # item ids, oldest first
    item: str  # what follows the context


def make_canaries(items: Iterable[tuple[str, str]], cfg: CanaryConfig) -> tuple[list[Canary], list[Canary]]:
    """``cfg.count`` patterns to plant and as many controls, services taken in turn, each drawn from
    ``items`` ``(service, item_id)`` of its service: ``context_items + 1`` distinct items.

    Raises:
        DataError: when a service has fewer items than a pattern needs.
    """
    by_service: dict[str, list[str]] = {}
    for service, item in sorted(items):
        by_service.setdefault(service, []).append(item)
    services = sorted(by_service)
    rng = random.Random(cfg.seed)
    planted, controls = [], []
    for i in range(cfg.count):
        service = services[i % len(services)]
        pool = by_service[service]
        if len(pool) < cfg.context_items + 1:
            raise DataError(
                f"sequences.canaries: {service} has {len(pool)} trainable items; a pattern needs "
                f"context_items + 1 = {cfg.context_items + 1}"
            )
        for out in (planted, controls):
            picks = rng.sample(pool, cfg.context_items + 1)
            out.append(Canary(service, tuple(picks[:-1]), picks[-1]))
    return planted, controls


def canary_user(pattern: int, copy: int) -> str:
    return f"{CANARY_PREFIX}{pattern:04d}-{copy:04d}"


def is_canary_user(user: str) -> bool:
    return user.startswith(CANARY_PREFIX)


def write_canary_record(
    seq_dir: Path, cfg: CanaryConfig, planted: list[Canary], controls: list[Canary]
) -> None:
    """Record the planted and control patterns (or remove a stale record when none are planted)."""
    path = Path(seq_dir) / CANARY_FILE
    if not cfg.count:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": asdict(cfg),
        "planted": [{**asdict(c), "context": list(c.context)} for c in planted],
        "controls": [{**asdict(c), "context": list(c.context)} for c in controls],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def read_canaries(seq_dir: Path) -> tuple[list[Canary], list[Canary]] | None:
    """The planted and control patterns of a sequences directory; None when none were planted."""
    path = Path(seq_dir) / CANARY_FILE
    if not path.exists():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
        return tuple(  # type: ignore[return-value]
            [Canary(c["service"], tuple(c["context"]), c["item"]) for c in record[key]]
            for key in ("planted", "controls")
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged ({e}); rebuild it with `moe-rec sequences build`") from e
