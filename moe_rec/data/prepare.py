"""``moe-rec data prepare``: read a source, validate it and write the prepared directory.

Sources live in :mod:`moe_rec.data.sources`; each returns (or, for the synthetic generator,
streams to disk) the same events and catalogue tables. This module writes them with
:mod:`moe_rec.data.store` and records ``stats.json``: users / items / interactions per service
and what every reader read, kept and rejected. Users deleted from this directory before (``moe-rec
data forget``, :mod:`moe_rec.data.forget`) are dropped again when the source still holds them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from moe_rec.config import to_dict
from moe_rec.data import forget, store
from moe_rec.data.config import DataConfig
from moe_rec.data.schema import DataError, ReadReport


def _clear(out_dir: Path) -> None:
    """Remove earlier shards, so a re-run replaces them instead of mixing with them."""
    for sub in (store.EVENTS_DIR, store.ITEMS_DIR):
        for old in (out_dir / sub).glob("*.parquet"):
            old.unlink()


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in sorted(counter.items(), key=lambda kv: -kv[1]))


def _require_kept_rows(report: ReadReport) -> None:
    """Stop when a reader kept no row: an empty table would only fail later, far from the cause
    (``datasets`` then says ``Instruction "train" corresponds to no data!``)."""
    if report.rows_kept:
        return
    then = "then re-run `moe-rec data prepare` (the prepared directory was left as it was)"
    if not report.rows_read:
        notes = f" ({_counts(report.notes)})" if report.notes else ""
        raise DataError(f"{report.source}: no rows read{notes}; check the data paths and services, {then}")
    first = f"; first: {report.examples[0]}" if report.examples else ""
    timestamps = "bad_timestamp" in report.rejected
    hint = "data.files.timestamp_unit (s, ms, iso or none)" if timestamps else "the data config"
    raise DataError(
        f"{report.source}: all {report.rows_read:,} rows were rejected ({_counts(report.rejected)}){first}; "
        f"fix the input or {hint}, {then}"
    )


def _read_source(cfg: DataConfig, out_dir: Path) -> tuple[ReadReport, ReadReport]:
    """Run the configured source; returns (events report, items report) once shards are written.
    A reader that fails (bad input in strict mode, or every row rejected) fails before anything
    earlier is removed."""
    if cfg.source == "synthetic":
        from moe_rec.data.sources import synthetic

        _clear(out_dir)
        return synthetic.write(cfg, out_dir)
    if cfg.source == "amazon2014":
        from moe_rec.data.sources import amazon2014 as reader
    elif cfg.source == "food_kitchen":
        from moe_rec.data.sources import food_kitchen as reader
    else:
        from moe_rec.data.sources import files as reader
    events, items, events_report, items_report = reader.read(cfg)
    for report in (items_report, events_report):  # the catalogue first: without it no event is kept
        _require_kept_rows(report)
    _clear(out_dir)
    store.write_items(items, out_dir)
    store.write_events(events, out_dir, cfg.num_shards)
    return events_report, items_report


def prepare(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Read ``cfg``'s source into ``out_dir`` and return the stats written to ``stats.json``."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    events_report, items_report = _read_source(cfg, out_dir)
    users, events = forget.reapply(out_dir)  # the source may still hold users deleted here before
    stats = store.compute_stats(
        store.load_table(out_dir, store.EVENTS_DIR), store.load_table(out_dir, store.ITEMS_DIR)
    )
    stats["source"] = cfg.source
    stats["reports"] = {"events": events_report.to_dict(), "items": items_report.to_dict()}
    stats["forgotten"] = {"users": users, "events": events}
    stats["config"] = json.loads(json.dumps(to_dict(cfg)))
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    store.write_stats(stats, out_dir)
    return stats
