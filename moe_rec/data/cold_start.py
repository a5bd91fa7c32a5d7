"""The cold-start benchmark: a share of each service's items never appears in training.

``sequences.cold_items: 0.1`` picks about 10 % of the catalogue (a stable hash of service and item
id, so every machine and rerun picks the same items) and keeps their events out of every training
window; ``sequences build`` writes the picked items to ``<sequences>/cold_items.json``, which the
trainer (those items are no training negatives, and so keep no learned vector), the evaluation
(metrics for ``cold`` and ``warm`` targets beside the per-service ones) and the baselines read.

Held-out requests keep cold items in their histories: a recommender that knows an item from its
text-born semantic ID can read it there. Baselines that need a trained embedding per item (SASRec)
or training counts (popularity) drop those events, as they would have to at serving time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from moe_rec.data.schema import DataError

COLD_FILE = "cold_items.json"
COLD, WARM = "cold", "warm"  # metric scopes of requests whose target is / is not a cold item


def is_cold(service: str, item_id: str, share: float) -> bool:
    """Whether ``(service, item_id)`` is among the ``share`` of items held out of training: a
    blake2b hash of the pair read as a number in [0, 1), the same on every machine."""
    if share <= 0.0:
        return False
    digest = hashlib.blake2b(f"{service}\t{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < share


def pick_cold_items(items: Iterable[tuple[str, str]], share: float) -> set[tuple[str, str]]:
    """The ``(service, item_id)`` pairs of ``items`` that :func:`is_cold` holds out."""
    return {(s, i) for s, i in items if is_cold(s, i, share)}


def write_cold_items(seq_dir: Path, share: float, cold: set[tuple[str, str]]) -> None:
    """Record the held-out items beside the sequences (or remove a stale record when share is 0)."""
    path = Path(seq_dir) / COLD_FILE
    if share <= 0.0:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"share": share, "items": sorted(map(list, cold))}) + "\n")


def read_cold_items(seq_dir: Path) -> set[tuple[str, str]]:
    """The held-out items of a sequences directory; empty when it holds none."""
    path = Path(seq_dir) / COLD_FILE
    if not path.exists():
        return set()
    try:
        return {(s, i) for s, i in json.loads(path.read_text())["items"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged ({e}); rebuild it with `moe-rec sequences build`") from e


def drop_cold_training(events: pa.Table, cold: set[tuple[str, str]] | None) -> pa.Table:
    """``events`` without the ``train``-split events of cold items (held-out events stay)."""
    if not cold:
        return events
    keys = pc.binary_join_element_wise(events.column("service"), events.column("item_id"), "\t")
    is_cold_event = pc.is_in(keys, value_set=pa.array([f"{s}\t{i}" for s, i in cold]))
    keep = pc.or_(pc.invert(is_cold_event), pc.not_equal(events.column("split"), "train"))
    return events.filter(keep)


def cold_groups(cold: set[tuple[str, str]] | None) -> tuple[str, ...]:
    """The metric groups (:class:`~moe_rec.eval.metrics.RankingMetrics`) of a run with ``cold`` items."""
    return (COLD, WARM) if cold else ()


def cold_labels(
    services: Sequence[str], items: Sequence[str], cold: set[tuple[str, str]] | None
) -> list[str] | None:
    """``cold`` / ``warm`` for each request's target (``None`` when there is no cold set)."""
    if not cold:
        return None
    return [COLD if (s, i) in cold else WARM for s, i in zip(services, items)]
