"""Deleting users from a prepared run: ``moe-rec data forget --user ID``.

A prepared directory holds every user's raw key and history in ``events/part-*.parquet``.
:func:`forget_users` rewrites the shards that hold the given users without their rows (each new
shard written beside the old one, then renamed over it; a shard left empty is removed),
recomputes ``stats.json`` and appends one line per user to ``forgotten.jsonl``:

    {"time": "2026-12-03T10:00:00+00:00", "user_hash": "<hex>", "events": 57,
     "services": {"grocery": 30, "delivery": 27}}

The log never holds the raw id: ``user_hash`` is a blake2b digest keyed by a random key made for
this directory (``forgotten.key``). It is what lets a second ``forget`` of the same user say
"already forgotten" while an id the data never held is an error naming it, and what lets
``data prepare`` drop forgotten users again when it re-reads a source that still holds them
(:func:`reapply`). A keyed digest cannot be matched against another run's log or a precomputed
table; but whoever holds the key can test a guessed id against the log, and no log that answers
"was this id forgotten?" can avoid that, so the key stays beside the data and goes with it.

What the deletion does not reach, and what must be redone, is in ``docs/privacy.md``: the
token samples built from the data (:func:`invalidate_sequences` removes them), and every
checkpoint, bundle and baseline trained before it (:func:`holders` lists them): the weights were
fitted to the user's history, so only retraining from the forgotten data removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_rec.data import store
from moe_rec.data.holdout import HOLDOUT_FILE, HOLDOUT_SPLIT
from moe_rec.data.schema import EVENT_SCHEMA, DataError

LOG_FILE = "forgotten.jsonl"
KEY_FILE = "forgotten.key"


class ForgetLog:
    """The deletion log of a prepared directory: keyed digests of forgotten users, with counts."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOG_FILE
        self.key_path = Path(data_dir) / KEY_FILE
        self._key: bytes | None = None

    def _read_key(self, create: bool) -> bytes | None:
        if self._key is None and self.key_path.exists():
            self._key = bytes.fromhex(self.key_path.read_text().strip())
        if self._key is None and create:
            self._key = secrets.token_bytes(32)
            self.key_path.write_text(self._key.hex() + "\n")
            self.key_path.chmod(0o600)
        return self._key

    def digest(self, user: str, create: bool = False) -> str | None:
        """The keyed digest of ``user``; None when the directory has no key yet (nothing forgotten)."""
        key = self._read_key(create)
        if key is None:
            return None
        return hashlib.blake2b(user.encode("utf-8"), key=key, digest_size=32).hexdigest()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise DataError(
                f"damaged deletion log ({e}); it must not be edited by hand", str(self.path)
            ) from e

    def hashes(self) -> dict[str, str]:
        """``user_hash -> time`` of its first deletion."""
        out: dict[str, str] = {}
        for r in self.records():
            out.setdefault(r["user_hash"], r["time"])
        return out

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class ForgetResult:
    """What :func:`forget_users` did: events removed per user (by service), users forgotten before."""

    forgotten: dict[str, dict[str, int]] = field(default_factory=dict)  # user -> service -> events
    already: dict[str, str] = field(default_factory=dict)  # user -> time of its earlier deletion
    shards_rewritten: int = 0
    shards_removed: int = 0
    time: str = ""

    @property
    def events(self) -> int:
        return sum(sum(s.values()) for s in self.forgotten.values())

    def per_service(self) -> dict[str, int]:
        total: Counter = Counter()
        for services in self.forgotten.values():
            total.update(services)
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, Any]:
        """Counts only (no user ids), as ``--json`` prints them beside the ids the caller gave."""
        return {
            "time": self.time,
            "users_forgotten": len(self.forgotten),
            "events_removed": self.events,
            "events_per_service": self.per_service(),
            "users_already_forgotten": len(self.already),
            "shards_rewritten": self.shards_rewritten,
            "shards_removed": self.shards_removed,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _counts(
    data_dir: Path, keep: Callable[[pa.ChunkedArray], pa.Array]
) -> tuple[dict[str, Counter], list[str]]:
    """Events per service of the users ``keep`` picks (``keep(users) -> bool mask``), and the shards
    that hold any of them."""
    counts: dict[str, Counter] = {}
    where: list[str] = []
    for shard in store.event_shard_paths(data_dir):
        try:
            table = pq.read_table(shard, columns=["user", "service"])
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"damaged or truncated Parquet shard ({e}); re-run `moe-rec data prepare`", shard
            ) from None
        picked = table.filter(keep(table.column("user")))
        if not picked.num_rows:
            continue
        grouped = picked.group_by(["user", "service"]).aggregate([("service", "count")])
        for row in grouped.to_pylist():
            counts.setdefault(row["user"], Counter())[row["service"]] += row["service_count"]
        where.append(shard)
    return counts, where


def _rewrite(shards: Iterable[str], drop: set[str]) -> tuple[int, int]:
    """Every shard in ``shards`` without the rows of users in ``drop``: all new files are written
    first (``.<name>.tmp`` beside each), then each is renamed over its shard, so a failure while
    writing changes nothing; a shard left empty is removed. Returns (rewritten, removed)."""
    value_set = pa.array(sorted(drop), pa.string())
    staged: list[tuple[Path, Path | None]] = []
    try:
        for shard in sorted(set(shards)):
            path = Path(shard)
            table = pq.read_table(path, schema=EVENT_SCHEMA)
            kept = table.filter(pc.invert(pc.is_in(table.column("user"), value_set=value_set)))
            if kept.num_rows == 0:
                staged.append((path, None))
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            store.write_shard(kept, tmp)
            staged.append((path, tmp))
    except BaseException:
        for _, tmp in staged:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    for path, tmp in staged:
        if tmp is None:
            path.unlink()
        else:
            os.replace(tmp, path)
    return sum(t is not None for _, t in staged), sum(t is None for _, t in staged)


def _update_stats(data_dir: Path, users: int, events: int) -> dict[str, Any]:
    """Recompute ``stats.json``'s counts from the shards as they are now; ``forgotten`` counts the
    users and events removed since the source was read (so ``rows_kept - forgotten.events`` is the
    number of events)."""
    path = data_dir / store.STATS_FILE
    stats = json.loads(path.read_text()) if path.exists() else {}
    stats.update(
        store.compute_stats(
            store.load_table(data_dir, store.EVENTS_DIR), store.load_table(data_dir, store.ITEMS_DIR)
        )
    )
    before = stats.get("forgotten", {"users": 0, "events": 0})
    stats["forgotten"] = {"users": before["users"] + users, "events": before["events"] + events}
    store.write_stats(stats, data_dir)
    return stats


def forget_users(data_dir: Path | str, users: Sequence[str]) -> ForgetResult:
    """Remove every event of ``users`` from the prepared directory ``data_dir``.

    A user with events is removed and logged; a user without events whose digest is in the log
    was forgotten before and is reported, not an error (so running the same deletion twice
    changes nothing the second time).

    Raises:
        DataError: before anything is changed, naming every id the directory never held (neither
            in the events nor in the log), or when the users are all of the data's users.
    """
    data_dir = Path(data_dir)
    wanted = list(dict.fromkeys(str(u) for u in users))
    if not wanted:
        raise DataError("no user given: pass --user ID (several times) or --users-file FILE")
    value_set = pa.array(wanted, pa.string())
    counts, where = _counts(data_dir, lambda column: pc.is_in(column, value_set=value_set))
    log = ForgetLog(data_dir)
    logged = log.hashes()
    result = ForgetResult(time=_now())
    unknown = []
    for user in wanted:
        if user in counts:
            continue
        digest = log.digest(user)
        if digest is not None and digest in logged:
            result.already[user] = logged[digest]
        else:
            unknown.append(user)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:20]) + (
            f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        )
        raise DataError(
            f"{len(unknown)} unknown user(s), in neither the events nor the deletion log: {shown}; "
            "nothing was changed",
            str(data_dir),
        )
    if not counts:
        return result
    remaining = store.read_stats(data_dir).get("total", {}).get("users")
    if remaining is not None and len(counts) >= remaining:
        raise DataError(
            f"these are all {remaining:,} users of the data; nothing would be left (delete the run "
            "directory instead); nothing was changed",
            str(data_dir),
        )
    result.shards_rewritten, result.shards_removed = _rewrite(where, set(counts))
    result.forgotten = {u: dict(sorted(counts[u].items())) for u in wanted if u in counts}
    log.append([
        {"time": result.time, "user_hash": log.digest(u, create=True), "events": sum(s.values()), "services": s}
        for u, s in result.forgotten.items()
    ])  # fmt: skip
    _update_stats(data_dir, len(result.forgotten), result.events)
    return result


def reapply(data_dir: Path | str) -> tuple[int, int]:
    """Drop again every user of the deletion log from a freshly prepared ``data_dir`` (``data
    prepare`` calls it after re-reading a source that still holds them); returns (users, events)
    removed. Does nothing when nothing was ever forgotten here."""
    data_dir = Path(data_dir)
    log = ForgetLog(data_dir)
    logged = log.hashes()
    if not logged:
        return 0, 0

    def forgotten(column: pa.ChunkedArray) -> pa.Array:
        names = pc.unique(column).to_pylist()
        hit = [u for u in names if log.digest(u) in logged]
        return pc.is_in(column, value_set=pa.array(hit, pa.string()))

    counts, where = _counts(data_dir, forgotten)
    if counts:
        _rewrite(where, set(counts))
    return len(counts), sum(sum(c.values()) for c in counts.values())


def read_users_file(path: Path | str) -> list[str]:
    """User ids, one a line (surrounding spaces stripped, blank lines skipped)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"cannot read the users file ({e.strerror})", str(path)) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


SEQUENCE_SPLITS = ("train", "valid", "test", HOLDOUT_SPLIT, "critique_valid", "critique_test")
TEXT_DIRS = ("critiques", "narratives")  # the critiques stage's outputs: rows keyed by user


def invalidate_critiques(run_dir: Path | str) -> list[Path]:
    """Remove the critiques and narratives of ``run_dir`` (their rows name users; every file and
    the stage stamp), so ``moe-rec run`` (with ``critiques.enabled``) builds them again from the
    data without the users. Returns the removed paths."""
    removed = []
    for name in TEXT_DIRS:
        for path in sorted((Path(run_dir) / name).glob("*")):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def invalidate_sequences(seq_dir: Path | str) -> list[Path]:
    """Remove the token samples of ``seq_dir`` (every split's Parquet files, the held-out users'
    record and the stage stamp), so nothing trains or evaluates on data that was deleted and
    ``moe-rec run`` rebuilds them; the vocabulary, the cold items and the canaries (no user
    data) stay. Returns the removed paths."""
    seq_dir = Path(seq_dir)
    removed = []
    for split in SEQUENCE_SPLITS:
        for path in sorted((seq_dir / split).glob("*.parquet")):
            path.unlink()
            removed.append(path)
    for name in ("stage.json", HOLDOUT_FILE):
        if (seq_dir / name).exists():
            (seq_dir / name).unlink()
            removed.append(seq_dir / name)
    return removed


def holders(run_dir: Path | str, before: float) -> list[tuple[Path, str]]:
    """What in ``run_dir`` was made before ``before`` (seconds since the epoch) from data that held
    the users: checkpoint tags, the bundle, baselines. ``(path, why)`` each."""
    run_dir = Path(run_dir)
    cut = before

    def older(path: Path) -> bool:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        return bool(files) and min(p.stat().st_mtime for p in files) <= cut

    found = []
    for tag in sorted((run_dir / "checkpoints").glob("step_*")):
        if older(tag):
            found.append((tag, "weights and optimizer state trained on the users' histories"))
    if (run_dir / "bundle").is_dir() and older(run_dir / "bundle"):
        found.append((run_dir / "bundle", "serving weights exported from such a checkpoint"))
    for baseline in sorted((run_dir / "baselines").glob("*")):
        if older(baseline):
            found.append((baseline, "a baseline trained on the users' histories"))
    return found


_TEXT = re.compile(rb"[^\x00-\x20\"'`,;|()\[\]{}<>\\\x7f-\xff]+")  # runs that could hold an id


def _readable(path: Path) -> bytes:
    """A file's bytes, plus for Parquet (compressed column chunks) its decoded rows as JSON text."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        try:
            data += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        except (pa.ArrowException, OSError):
            pass
    return data


def find_strings(root: Path | str, needles: Iterable[str]) -> dict[str, set[str]]:
    """Which of ``needles`` (user ids) occur in each file under ``root`` (a run directory, a
    bundle): raw bytes, Parquet also decoded. An id is found inside a longer run of text too
    (``user=u42;``), but not across a quote, comma, bracket or space. Returns ``relative path ->
    ids found`` for the files that hold any."""
    root = Path(root)
    wanted = {n.encode() for n in needles if n}
    lengths = sorted({len(n) for n in wanted})
    found: dict[str, set[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
        hits: set[bytes] = set()
        for run in _TEXT.findall(_readable(path)):
            if run in wanted:
                hits.add(run)
                continue
            for n in lengths:
                if n >= len(run):
                    break
                hits.update(run[i : i + n] for i in range(len(run) - n + 1) if run[i : i + n] in wanted)
        if hits:
            found[path.relative_to(root).as_posix() if root.is_dir() else path.name] = {
                h.decode() for h in hits
            }
    return found
