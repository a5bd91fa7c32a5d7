"""Read and write a prepared data directory as Parquet shards through HF ``datasets``.

Layout of a prepared directory::

    <dir>/events/part-00000.parquet ...   events (EVENT_SCHEMA); each user's rows in one shard
    <dir>/items/part-00000.parquet ...    catalogue (ITEM_SCHEMA)
    <dir>/stats.json                      users / items / interactions per service, rejections

Keeping every user inside one shard lets a later stage build sequences shard by shard and lets
training give each rank whole shards.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from datasets.table import InMemoryTable

from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, DataError

EVENTS_DIR = "events"
ITEMS_DIR = "items"
STATS_FILE = "stats.json"


def _features(schema: pa.Schema) -> datasets.Features:
    return datasets.Features.from_arrow_schema(schema)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` cast to ``schema``; a nullable column it lacks is added as nulls (a catalogue
    written before ``item_text`` existed, or by a caller that has no such column)."""
    for f in schema:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table if table.schema == schema else table.cast(schema)


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one Parquet shard through ``datasets`` (table must already have the right schema)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset(InMemoryTable(table)).to_parquet(str(path))


def shard_bounds_by_user(users: pa.ChunkedArray | pa.Array, num_shards: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` that cut a user-sorted table into ``num_shards`` balanced pieces
    without splitting a user. Fewer pieces come back when there are fewer users than shards."""
    n = len(users)
    if n == 0:
        return [(0, 0)]
    values = users.to_pylist() if hasattr(users, "to_pylist") else list(users)
    starts = [0] + [i for i in range(1, n) if values[i] != values[i - 1]]  # first row of each user
    bounds, begin = [], 0
    for k in range(1, num_shards):
        target = round(n * k / num_shards)
        j = bisect.bisect_left(starts, max(target, begin + 1))  # first user starting at/after target
        if j == len(starts):
            break
        cut = starts[j]
        bounds.append((begin, cut))
        begin = cut
    bounds.append((begin, n))
    return bounds


def write_events(table: pa.Table, out_dir: Path, num_shards: int) -> list[Path]:
    """Write a user-sorted events table as ``num_shards`` Parquet shards (whole users per shard)."""
    if table.schema != EVENT_SCHEMA:
        table = table.cast(EVENT_SCHEMA)
    paths = []
    for i, (start, stop) in enumerate(shard_bounds_by_user(table.column("user"), num_shards)):
        path = Path(out_dir) / EVENTS_DIR / f"part-{i:05d}.parquet"
        write_shard(table.slice(start, stop - start), path)
        paths.append(path)
    return paths


def write_items(table: pa.Table, out_dir: Path) -> Path:
    table = _conform(table, ITEM_SCHEMA)
    path = Path(out_dir) / ITEMS_DIR / "part-00000.parquet"
    write_shard(table, path)
    return path


def _shards(data_dir: Path, sub: str) -> list[str]:
    files = sorted(str(p) for p in (Path(data_dir) / sub).glob("*.parquet"))
    if not files:
        raise DataError(
            f"no Parquet shards in {Path(data_dir) / sub}; run `moe-rec data prepare` first", str(data_dir)
        )
    return files


def _damaged(path: str, error: Exception) -> DataError:
    return DataError(f"damaged or truncated Parquet shard ({error}); re-run `moe-rec data prepare`", path)


def _from_parquet(files: list[str], schema: pa.Schema, **kwargs: Any) -> datasets.Dataset:
    """``datasets.Dataset.from_parquet`` that names a damaged shard instead of failing deep inside
    ``datasets``: every footer is read first (a truncated file has none), and when the data itself
    does not read, each shard is read on its own to find the bad one."""
    for path in files:
        try:
            names = set(pq.read_metadata(path).schema.to_arrow_schema().names)
        except (pa.ArrowException, OSError) as e:
            raise _damaged(path, e) from None
    older = [f for f in schema if f.name not in names and f.nullable]  # a column added since it was written
    try:
        if older:
            stored = pa.schema([f for f in schema if f not in older])
            ds = datasets.Dataset.from_parquet(
                files, features=_features(stored), keep_in_memory=True, **kwargs
            )
            return datasets.Dataset(InMemoryTable(_conform(ds.data.table, schema)))
        return datasets.Dataset.from_parquet(files, features=_features(schema), keep_in_memory=True, **kwargs)
    except (DatasetGenerationError, pa.ArrowException, OSError) as e:
        for path in files:
            try:
                pq.read_table(path)
            except (pa.ArrowException, OSError) as bad:
                raise _damaged(path, bad) from e
        raise


def load_events(
    data_dir: Path, split: str | None = None, services: list[str] | None = None
) -> datasets.Dataset:
    """Events of a prepared directory as a ``datasets.Dataset`` (optionally one split / some services)."""
    filters = []
    if split is not None:
        filters.append(("split", "=", split))
    if services is not None:
        filters.append(("service", "in", list(services)))
    return _from_parquet(_shards(data_dir, EVENTS_DIR), EVENT_SCHEMA, filters=filters or None)


def load_items(data_dir: Path) -> datasets.Dataset:
    """The catalogue of a prepared directory as a ``datasets.Dataset``."""
    return _from_parquet(_shards(data_dir, ITEMS_DIR), ITEM_SCHEMA)


def event_shard_paths(data_dir: Path) -> list[str]:
    return _shards(data_dir, EVENTS_DIR)


def load_table(data_dir: Path, sub: str = EVENTS_DIR) -> pa.Table:
    """All shards of ``events`` or ``items`` as one Arrow table (zero-copy from the dataset)."""
    ds = load_events(data_dir) if sub == EVENTS_DIR else load_items(data_dir)
    return ds.data.table


def compute_stats(events: pa.Table, items: pa.Table) -> dict[str, Any]:
    """Users / items / interactions per service and overall, plus split sizes."""
    per_service: dict[str, Any] = {}
    services = sorted(set(items.column("service").to_pylist()) | set(events.column("service").to_pylist()))
    for service in services:
        ev = events.filter(pc.equal(events.column("service"), service))
        it = items.filter(pc.equal(items.column("service"), service))
        splits = ev.group_by("split").aggregate([("split", "count")]).to_pylist()
        per_service[service] = {
            "users": len(pc.unique(ev.column("user"))),
            "items": it.num_rows,
            "items_with_events": len(pc.unique(ev.column("item_id"))),
            "interactions": ev.num_rows,
            "splits": {row["split"]: row["split_count"] for row in sorted(splits, key=lambda r: r["split"])},
        }
    user_services = events.group_by("user").aggregate([("service", "count_distinct")])
    counts = user_services.column("service_count_distinct").to_pylist()
    return {
        "services": per_service,
        "total": {
            "users": user_services.num_rows,
            "items": items.num_rows,
            "interactions": events.num_rows,
            "users_in_several_services": sum(1 for c in counts if c > 1),
        },
    }


def write_stats(stats: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2, sort_keys=False) + "\n")
    return path


def read_stats(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / STATS_FILE
    if not path.exists():
        raise DataError(f"no {STATS_FILE}; run `moe-rec data prepare` first", str(data_dir))
    return json.loads(path.read_text())
