"""User histories -> token sequences for training and leave-one-out evaluation.

Every event is written ``[service][c1]..[cL][dedup]`` (see :mod:`moe_rec.data.vocab`); a sequence
starts with ``[BOS]``. Each token also carries the index of its event's service in ``domain_ids``
(``[BOS]`` takes the service of the token after it), which the model's router reads.

Cross-service order. A user's events from all services form one history. When every event of
the user has a timestamp they are ordered by time; when a source gives only order (Amazon 2014)
they are interleaved by progress through each service's history (event i of n sits at
``(i + 1) / n``), which keeps each service's order exact and spreads the services evenly. With
``order: asked_last`` (only for histories without timestamps, where any cross-service order is
made up) a sample is written for one service instead: the other services' events first (in the
order above), then that service's own, so its events sit together and nearest the prediction as
in a one-service model, and the history cap keeps the service's own latest events first; a
training window then labels only its service's events (an event is a label only in its
service's windows).

Samples:

* **train** — the unified history of ``train``-split events; a window of at most ``max_events``
  events ends every ``train_stride`` events counted back from the latest; ``labels`` hold the
  item-code tokens of every event in the window (-100 elsewhere: service tokens are given, not
  predicted). With ``order: asked_last``, per service of the user: its events' windows, each
  after the other services' events, labelling its service's events only.
* With ``cold_items`` (the cold-start benchmark, :mod:`moe_rec.data.cold_start`) the training
  history leaves out the events of that share of items.
* With ``holdout_users`` (:mod:`moe_rec.data.holdout`) that share of users has no training window;
  the windows they would have had go to the ``holdout`` split, which nothing trains on.
* With ``canaries.count`` (:mod:`moe_rec.data.canaries`) synthetic users whose histories are
  planted patterns add training windows of their own (``train/part-canaries.parquet``).
* **valid / test** — one sample per held-out event (leave-one-out per service). The context is
  the target's own service history before it plus the other services' ``train`` events (those
  before it in time, when there are timestamps), the most recent ``max_events`` of them, then the
  target's service token; the model must produce the target's ``L+1`` codes. Other services'
  held-out events never enter a context, so no service's answer leaks into another's input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from moe_rec.console import progress
from moe_rec.data import store
from moe_rec.data.canaries import (
    CANARY_SHARD,
    Canary,
    CanaryConfig,
    canary_user,
    make_canaries,
    write_canary_record,
)
from moe_rec.data.cold_start import is_cold
from moe_rec.data.holdout import HOLDOUT_SPLIT, is_held_out, write_holdout_record
from moe_rec.data.schema import EVENT_SCHEMA, DataError
from moe_rec.data.vocab import BOS, Vocabulary

IGNORE_INDEX = -100
T = TypeVar("T")

ORDERS = ("interleave", "asked_last")

_TOKENS = datasets.Sequence(datasets.Value("int32"))
_COMMON = {
    "user": datasets.Value("string"),
    "service": datasets.Value("string"),
    "input_ids": _TOKENS,
    "domain_ids": _TOKENS,
}
SAMPLE_FEATURES = {
    "train": datasets.Features({**_COMMON, "labels": _TOKENS}),
    "valid": datasets.Features({**_COMMON, "target": _TOKENS, "target_item": datasets.Value("string")}),
    "test": datasets.Features({**_COMMON, "target": _TOKENS, "target_item": datasets.Value("string")}),
}
SAMPLE_FEATURES[HOLDOUT_SPLIT] = SAMPLE_FEATURES["train"]  # the windows held-out users would have had


DISTRACTOR_PLACES = ("before", "after", "either")


@dataclass
class TextSampleConfig:
    """``sequences.text``: how critique and narrative rows become samples (:mod:`moe_rec.data.text_samples`,
    with ``critiques.enabled``)."""

    critiques_per_user: int = 4  # latest training critiques per user that become samples (0: none)
    narratives_per_user: int = 2  # latest training narratives per user that become samples (0: none)
    tokenizer_size: int = 4096  # subwords of the byte-level BPE trained on the run's text
    max_text_tokens: int = 48  # a critique's or narrative's words are cut after this many subwords
    # a text file of sentences that ask for nothing (one a line, e.g. tools/iard_distractors.py's);
    # this share of the training critique samples gets one beside its words, so the model learns to
    # read past small talk it never saw (docs/critiques.md); requests are never changed
    distractors: str | None = None
    distractor_share: float = 0.5
    distractor_place: str = "before"  # before the critique's words, "after" them, or "either" (by hash)

    def __post_init__(self) -> None:
        if self.critiques_per_user < 0 or self.narratives_per_user < 0:
            raise ValueError("sequences.text: critiques_per_user and narratives_per_user must be >= 0")
        if not 0.0 <= self.distractor_share <= 1.0:
            raise ValueError(
                f"sequences.text.distractor_share must be in [0, 1], got {self.distractor_share}"
            )
        if self.distractor_place not in DISTRACTOR_PLACES:
            raise ValueError(
                f"sequences.text.distractor_place must be one of {', '.join(DISTRACTOR_PLACES)}, "
                f"got {self.distractor_place!r}"
            )
        if self.tokenizer_size < 257 or self.max_text_tokens < 1:
            raise ValueError("sequences.text: tokenizer_size must be > 256 and max_text_tokens >= 1")


@dataclass
class SequenceConfig:
    max_events: int = 50  # history cap: the most recent N events
    train_stride: int = 1  # a training window ends every `train_stride` events
    min_train_events: int = 2  # shorter training windows are not emitted
    cold_items: float = 0.0  # share of items kept out of training (the cold-start benchmark)
    holdout_users: float = 0.0  # share of users never trained on (the membership-inference audit)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)  # planted patterns (the exposure audit)
    text: TextSampleConfig = field(default_factory=TextSampleConfig)  # critique and narrative samples
    # interleave: by time, else by progress; asked_last (untimed histories only): the other
    # services' events first, the sample's own service's last (module docstring)
    order: str = "interleave"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"sequences.order must be one of {list(ORDERS)}, got {self.order!r}")
        if self.max_events < 1 or self.train_stride < 1 or self.min_train_events < 1:
            raise ValueError("max_events, train_stride and min_train_events must be >= 1")
        if not 0.0 <= self.cold_items < 1.0:
            raise ValueError(f"cold_items is a share of the catalogue in [0, 1), got {self.cold_items}")
        if not 0.0 <= self.holdout_users < 1.0:
            raise ValueError(f"holdout_users is a share of the users in [0, 1), got {self.holdout_users}")


def user_bucket(user: str, num_buckets: int) -> int:
    """Stable hash of a user key into ``[0, num_buckets)`` (the router's user signal); the same on
    every machine and Python process, unlike ``hash()``."""
    digest = hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_buckets


@dataclass(frozen=True)
class Event:
    service: str
    item_id: str
    timestamp: int | None
    position: int
    split: str


def iter_users(table: pa.Table) -> Iterator[tuple[str, list[Event]]]:
    """Yield ``(user, events)`` from an events table sorted by user (as every shard is)."""
    cols = {
        c: table.column(c).to_pylist()
        for c in ("user", "service", "item_id", "timestamp", "position", "split")
    }
    users = cols["user"]
    start = 0
    for i in range(1, len(users) + 1):
        if i == len(users) or users[i] != users[start]:
            yield (
                users[start],
                [
                    Event(
                        cols["service"][j],
                        cols["item_id"][j],
                        cols["timestamp"][j],
                        cols["position"][j],
                        cols["split"][j],
                    )
                    for j in range(start, i)
                ],
            )
            start = i


def unified_order(events: Sequence[Event], services: Sequence[str]) -> list[Event]:
    """One history across services: by time when all events are timed, else by progress."""
    rank = {s: i for i, s in enumerate(services)}
    if all(e.timestamp is not None for e in events):
        return sorted(events, key=lambda e: (e.timestamp, rank.get(e.service, 0), e.position))
    length: dict[str, int] = {}
    for e in events:
        length[e.service] = max(length.get(e.service, 0), e.position + 1)
    return sorted(
        events, key=lambda e: ((e.position + 1) / length[e.service], rank.get(e.service, 0), e.position)
    )


def asked_last(items: Sequence[T], services: Sequence[str], asked: str) -> list[T]:
    """``items`` (one per event, ``services`` theirs) with the ``asked`` service's moved after the
    others', each part in its given order (``sequences.order: asked_last``)."""
    return [x for x, s in zip(items, services) if s != asked] + [
        x for x, s in zip(items, services) if s == asked
    ]


def prompt(
    vocab: Vocabulary, items: Sequence[tuple[str, Sequence[int]]], service: str
) -> dict[str, list[int]]:
    """The question the model answers at evaluation and serving time: ``[BOS]``, each history item's
    tokens (``items``: ``(service, full codes)``, oldest first), then ``service``'s token. ``domain_ids``
    give each token its item's service; ``[BOS]`` takes the first item's (the asked service's when
    the history is empty)."""
    input_ids, domain_ids = [BOS], []
    for item_service, codes in items:
        tokens = vocab.item_tokens(item_service, codes)
        input_ids += tokens
        domain_ids += [vocab.service_index(item_service)] * len(tokens)
    input_ids.append(vocab.service_token(service))
    domain_ids.append(vocab.service_index(service))
    return {"input_ids": input_ids, "domain_ids": [domain_ids[0], *domain_ids]}


class SequenceBuilder:
    """Turns one user's events into token samples.

    Args:
        vocab: the token layout.
        item_codes: ``(service, item_id) -> (c1..cL, dedup)`` for every item (from the SID table).
        cfg: history cap and windowing.
    """

    def __init__(
        self, vocab: Vocabulary, item_codes: Mapping[tuple[str, str], Sequence[int]], cfg: SequenceConfig
    ) -> None:
        self.vocab = vocab
        self.item_codes = item_codes
        self.cfg = cfg

    def event_codes(self, e: Event) -> Sequence[int]:
        codes = self.item_codes.get((e.service, e.item_id))
        if codes is None:
            raise DataError(
                f"item {e.service}/{e.item_id} has no semantic ID; were the SIDs built from this catalogue?"
            )
        return codes

    def encode(
        self, events: Sequence[Event], label_items: bool, labelled: str | None = None
    ) -> dict[str, list[int]]:
        """``[BOS]`` + the events' tokens, with ``domain_ids`` and (if asked) item-code ``labels``:
        of every event, or with ``labelled`` of that service's events only."""
        input_ids, domain_ids, labels = [BOS], [], [IGNORE_INDEX]
        for e in events:
            tokens = self.vocab.item_tokens(e.service, self.event_codes(e))
            input_ids += tokens
            domain_ids += [self.vocab.service_index(e.service)] * len(tokens)
            label = label_items and labelled in (None, e.service)
            labels += [IGNORE_INDEX] + (tokens[1:] if label else [IGNORE_INDEX] * (len(tokens) - 1))
        domain_ids.insert(0, domain_ids[0] if domain_ids else 0)
        out = {"input_ids": input_ids, "domain_ids": domain_ids}
        if label_items:
            out["labels"] = labels
        return out

    def train_samples(self, user: str, events: Sequence[Event]) -> Iterator[dict[str, Any]]:
        """Sliding windows over the user's unified ``train`` history (without cold items' events);
        none for a user held out of training."""
        if not is_held_out(user, self.cfg.holdout_users):
            yield from self.windows(user, events)

    def holdout_samples(self, user: str, events: Sequence[Event]) -> Iterator[dict[str, Any]]:
        """The windows :meth:`train_samples` leaves out for a held-out user (none for anyone else)."""
        if is_held_out(user, self.cfg.holdout_users):
            yield from self.windows(user, events)

    def windows(self, user: str, events: Sequence[Event]) -> Iterator[dict[str, Any]]:
        """Sliding windows over ``events``' unified ``train`` history, latest first, whoever the user."""
        history = [
            e
            for e in self.ordered(user, events)
            if e.split == "train" and not is_cold(e.service, e.item_id, self.cfg.cold_items)
        ]
        if self.cfg.order == "interleave":
            yield from self._windows(user, [], history, labelled=None)
            return
        for service in dict.fromkeys(e.service for e in history):  # each service's own windows
            own = [e for e in history if e.service == service]
            others = [e for e in history if e.service != service]
            yield from self._windows(user, others, own, labelled=service)

    def _windows(
        self, user: str, context: list[Event], history: list[Event], labelled: str | None
    ) -> Iterator[dict[str, Any]]:
        """A window ends every ``train_stride`` events of ``history`` counted back from its latest,
        each the last ``max_events`` of ``context`` + ``history`` up to there."""
        cfg = self.cfg
        for end in range(len(history), 0, -cfg.train_stride):
            window = (context + history[:end])[-cfg.max_events :]
            if len(window) < cfg.min_train_events:
                break
            yield {
                "user": user,
                "service": window[-1].service,
                **self.encode(window, label_items=True, labelled=labelled),
            }

    def ordered(self, user: str, events: Sequence[Event]) -> list[Event]:
        """The user's events in :func:`unified_order`; refused for timed ones with ``asked_last``
        (their order is real: a made-up one would throw it away)."""
        if self.cfg.order == "asked_last" and events and all(e.timestamp is not None for e in events):
            raise DataError(
                f"user {user!r}: sequences.order=asked_last is for histories without timestamps, and "
                "this one has them; use sequences.order=interleave (time order)"
            )
        return unified_order(events, self.vocab.services)

    def eval_samples(self, user: str, events: Sequence[Event], split: str) -> Iterator[dict[str, Any]]:
        """One leave-one-out sample per held-out event of ``split`` (``valid`` or ``test``)."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        ordered = self.ordered(user, events)
        for target in (e for e in ordered if e.split == split):
            context = [
                e
                for e in ordered
                if (e.service == target.service and e.position < target.position)
                or (
                    e.service != target.service
                    and e.split == "train"
                    and (target.timestamp is None or e.timestamp is None or e.timestamp < target.timestamp)
                )
            ]
            if self.cfg.order == "asked_last":
                context = asked_last(context, [e.service for e in context], target.service)
            context = context[-self.cfg.max_events :]
            yield {
                "user": user,
                "service": target.service,
                **prompt(self.vocab, [(e.service, self.event_codes(e)) for e in context], target.service),
                "target": list(self.item_codes[(target.service, target.item_id)]),
                "target_item": target.item_id,
            }


def build_samples(table: pa.Table, builder: SequenceBuilder, split: str) -> Iterator[dict[str, Any]]:
    """All samples of ``split`` (train / valid / test) from a user-sorted events table."""
    for user, events in iter_users(table):
        if split == "train":
            yield from builder.train_samples(user, events)
        elif split == HOLDOUT_SPLIT:
            yield from builder.holdout_samples(user, events)
        else:
            yield from builder.eval_samples(user, events, split)


def canary_samples(builder: SequenceBuilder) -> tuple[list[dict[str, Any]], list[Canary], list[Canary]]:
    """The training windows of the synthetic users that carry ``builder.cfg.canaries``' planted
    patterns (:mod:`moe_rec.data.canaries`), and the planted and control patterns."""
    cfg = builder.cfg
    trainable = (k for k in builder.item_codes if not is_cold(k[0], k[1], cfg.cold_items))
    planted, controls = make_canaries(trainable, cfg.canaries)
    rows = []
    for p, canary in enumerate(planted):
        items = [*canary.context, canary.item]
        events = [Event(canary.service, item, None, i, "train") for i, item in enumerate(items)]
        for c in range(cfg.canaries.copies):
            rows += builder.windows(canary_user(p, c), events)
    return rows, planted, controls


def write_sequences(
    data_dir: Path,
    builder: SequenceBuilder,
    out_dir: Path,
    splits: Sequence[str] = ("train", "valid", "test"),
) -> dict[str, int]:
    """Write ``<out_dir>/<split>/part-XXXXX.parquet`` (one per event shard that has samples of the
    split) through ``datasets``, replacing earlier files; returns the number of samples per split.
    With ``holdout_users`` the ``holdout`` split is written too (and recorded), with ``canaries``
    the planted patterns' windows join ``train`` (and the patterns are recorded)."""
    cfg = builder.cfg
    if cfg.holdout_users > 0 and "train" in splits:
        splits = (*splits, HOLDOUT_SPLIT)
    counts = dict.fromkeys(splits, 0)
    stale = (*splits, HOLDOUT_SPLIT) if "train" in splits else splits  # an earlier build's holdout goes too
    for split in dict.fromkeys(stale):
        for old in (Path(out_dir) / split).glob("*.parquet"):
            old.unlink()
    shards = store.event_shard_paths(data_dir)
    held_out_users: set[str] = set()
    with progress() as bar:
        task = bar.add_task("sequences", total=len(shards) * len(splits))
        for i, shard in enumerate(shards):
            table = pq.read_table(shard, schema=EVENT_SCHEMA)
            for split in splits:
                rows = list(build_samples(table, builder, split))
                counts[split] += len(rows)
                bar.advance(task)
                if not rows:  # a shard can hold no sample of a split; datasets cannot read an empty file
                    continue
                if split == HOLDOUT_SPLIT:
                    held_out_users.update(r["user"] for r in rows)
                path = Path(out_dir) / split / f"part-{i:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                datasets.Dataset.from_list(rows, features=SAMPLE_FEATURES[split]).to_parquet(str(path))
    if "train" in splits:
        write_holdout_record(out_dir, cfg.holdout_users, len(held_out_users), counts.get(HOLDOUT_SPLIT, 0))
        rows, planted, controls = canary_samples(builder) if cfg.canaries.count else ([], [], [])
        if rows:
            path = Path(out_dir) / "train" / CANARY_SHARD
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=SAMPLE_FEATURES["train"]).to_parquet(str(path))
            counts["train"] += len(rows)
        write_canary_record(out_dir, cfg.canaries, planted, controls)
    return counts
