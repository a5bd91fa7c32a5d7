"""The data model: event and catalogue columns, the read report, and the data error.

Every source (Amazon 2014, food+kitchen, the user's own files, the synthetic generator) ends in
the same two tables, so every later stage reads one layout:

* **events** — one row per interaction, grouped per user; a user's rows in one service are in
  chronological order with ``position`` 0..n-1 and a leave-one-out ``split``.
* **items** — the catalogue, one row per ``(service, item_id)``.

A :class:`ReadReport` travels with every reader and counts rows read / kept / rejected by reason,
so nothing is dropped silently. In strict mode the first rejected row raises a :class:`DataError`
that names the file and line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from moe_rec.errors import MoeRecError

SPLITS = ("train", "valid", "test")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),  # unified user key across services
        pa.field("service", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64()),  # unix seconds; null when the source gives only order
        pa.field("position", pa.int32(), nullable=False),  # 0-based index in the user's service history
        pa.field("split", pa.string(), nullable=False),  # train | valid | test (leave-one-out per service)
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("quantity", pa.float32()),
        pa.field("price", pa.float32()),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("service", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("brand", pa.string()),
        pa.field("price", pa.float32()),
        pa.field("text", pa.string()),  # free text (description, keywords)
        pa.field(
            "item_text", pa.string()
        ),  # pre-composed encoder input, used as is (moe_rec/sid/item_text.py)
    ]
)

EVENT_COLUMNS = tuple(EVENT_SCHEMA.names)
ITEM_COLUMNS = tuple(ITEM_SCHEMA.names)


class DataError(MoeRecError, ValueError):
    """Bad input data, with where it was found (``file:line``) and what is wrong."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class ReadReport:
    """Counts of what a reader saw, kept and rejected, by reason.

    ``rejected`` counts rows that were not kept (each with a reason); ``notes`` counts things
    that were kept but are worth knowing (e.g. a history re-sorted by timestamp, a one-event
    history). ``examples`` keeps the first few ``where: reason: detail`` lines for the user.
    """

    source: str
    strict: bool = False
    rows_read: int = 0
    rows_kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def reject(self, reason: str, where: str, detail: str = "") -> None:
        """Count one rejected row; in strict mode raise a :class:`DataError` instead."""
        message = f"{reason}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(message, where)
        self.rejected[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {message}")

    def note(self, what: str, count: int = 1) -> None:
        self.notes[what] += count

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_rejected": self.rows_rejected,
            "rejected": dict(sorted(self.rejected.items())),
            "notes": dict(sorted(self.notes.items())),
            "examples": list(self.examples),
        }
