"""Config of the data stage: which source, where it is, and how strictly it is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class SyntheticConfig:
    """The synthetic three-service generator (grocery, marketplace, delivery).

    What each knob plants is described in ``moe_rec/data/sources/synthetic.py``. Sizes are per
    run; everything is deterministic given ``seed`` and independent of ``users_per_shard``.
    """

    num_users: int = 2000  # users; each is active in one to three services
    items_per_service: int = 1500  # catalogue size of each service (at least num_topics)
    mean_events_per_user: float = 30.0  # mean history length summed over the user's services
    mean_events_per_session: float = 3.0  # mean session length (geometric, >= 1); a session is in one service
    share_two_services: float = 0.35  # share of users active in exactly two services
    share_three_services: float = 0.25  # share of users active in all three (the rest use one)
    num_topics: int = 16  # latent tastes shared across services (at most the 16 named in synthetic.py)
    max_topics_per_user: int = 3  # a user's taste mixes 1..this many topics (Dirichlet(1) weights)
    off_taste_prob: float = 0.1  # chance an event's topic ignores the user's taste (global topic popularity)
    zipf_exponent: float = 1.05  # item popularity within a (service, topic) follows Zipf(s) over rank
    grocery_repeat_prob: float = 0.45  # chance a grocery event re-buys an item the user bought before
    marketplace_repeat_prob: float = 0.03  # same for marketplace (durable goods: rarely re-bought)
    delivery_repeat_prob: float = 0.25  # same for delivery (favourite dishes re-ordered)
    session_gap_hours: float = 48.0  # mean gap between sessions (>= 1 h); events in a session minutes apart
    start_timestamp: int = 1_672_531_200  # unix s (2023-01-01 UTC); first sessions are in the 30 days after
    users_per_shard: int = 20_000  # users generated and written per Parquet shard (bounds memory)
    seed: int = 0

    def __post_init__(self) -> None:
        counts = ("num_users", "items_per_service", "num_topics", "max_topics_per_user", "users_per_shard")
        for name in counts + ("mean_events_per_user", "mean_events_per_session"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "share_two_services",
            "share_three_services",
            "off_taste_prob",
            "grocery_repeat_prob",
            "marketplace_repeat_prob",
            "delivery_repeat_prob",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synthetic.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.share_two_services + self.share_three_services > 1.0:
            raise ValueError("synthetic.share_two_services + share_three_services must be <= 1")
        if self.zipf_exponent < 0:
            raise ValueError(f"synthetic.zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.session_gap_hours < 1:
            raise ValueError(f"synthetic.session_gap_hours must be >= 1, got {self.session_gap_hours}")


@dataclass
class FilesConfig:
    """The user's own events + catalogue files (Parquet, CSV or JSONL), see README "Your own data"."""

    events: list[str] = field(default_factory=list)  # paths or globs
    catalogue: list[str] = field(default_factory=list)  # paths or globs
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"  # auto: from the file suffix
    # our column name -> the column name in your files (only the ones that differ)
    event_columns: dict[str, str] = field(default_factory=dict)
    item_columns: dict[str, str] = field(default_factory=dict)
    # how the timestamp column is written; none: there is none (order-only data), a user's events in
    # one service keep the order of the files (files in the order listed, a glob's matches sorted)
    timestamp_unit: Literal["s", "ms", "iso", "none"] = "s"
    category_separator: str = "|"  # categories given as one string are split on this
    # the service of every row of a file that has no service column (one-service data); None: required
    default_service: str | None = None

    def __post_init__(self) -> None:
        if self.default_service is not None and not self.default_service.strip():
            raise ValueError("files.default_service must be a service name or null, got an empty string")


@dataclass
class DataConfig:
    source: Literal["synthetic", "amazon2014", "food_kitchen", "files"] = "synthetic"
    path: Path | None = None  # root folder of amazon2014 / food_kitchen (e.g. ../shared/data/amazon2014)
    services: list[str] | None = None  # services to keep (default: all the source has)
    strict: bool = False  # True: the first malformed row is an error; False: counted and skipped
    num_shards: int = 4  # event shards written (whole users per shard)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    files: FilesConfig = field(default_factory=FilesConfig)

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.source in ("amazon2014", "food_kitchen") and self.path is None:
            raise ValueError(f"source {self.source!r} needs data.path (the folder with its files)")
        if self.source == "files" and not self.files.events:
            raise ValueError("source 'files' needs data.files.events (paths or globs of event files)")
