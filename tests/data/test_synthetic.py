"""The synthetic generator: determinism, layout, leave-one-out splits and the planted structure."""

from __future__ import annotations

import math
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_rec.data import store, structure
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, DataError
from moe_rec.data.sources import synthetic

SMALL = dict(num_users=800, items_per_service=600, users_per_shard=200)


def _share_tol(p: float, n: int) -> float:
    """4 standard errors of a share whose n draws are each ``p`` (a seeded run misses by more only
    if the generator is wrong)."""
    return 4 * math.sqrt(p * (1 - p) / n)


def _repeat_tol(hist: dict[tuple[str, str], list[str]], service: str, p: float) -> float:
    """``_share_tol`` of a repeat rate: each event after a history's first repeats with ``p``."""
    return _share_tol(p, sum(len(items) - 1 for (_, s), items in hist.items() if s == service))


def _generate(out: Path, services: list[str] | None = None, **synthetic_cfg: float) -> tuple:
    cfg = DataConfig(services=services, synthetic=SyntheticConfig(**{**SMALL, **synthetic_cfg}))
    return synthetic.write(cfg, out)


def _shards(out: Path) -> list[Path]:
    return sorted((out / store.EVENTS_DIR).glob("*.parquet"))


def _events(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in _shards(out))


def _items(out: Path) -> pa.Table:
    return pq.read_table(out / store.ITEMS_DIR / "part-00000.parquet")


def _histories(events: pa.Table) -> dict[tuple[str, str], list[dict]]:
    """Rows per (user, service) in table order."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in events.to_pylist():
        out[(row["user"], row["service"])].append(row)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One small run: (out_dir, events_report, items_report, events, items)."""
    out = tmp_path_factory.mktemp("synthetic")
    events_report, items_report = _generate(out)
    return out, events_report, items_report, _events(out), _items(out)


def test_same_config_gives_byte_identical_files(run: tuple, tmp_path: Path) -> None:
    out = run[0]
    _generate(tmp_path)
    files = [p.relative_to(out) for p in sorted(out.rglob("*.parquet"))]
    assert files == [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*.parquet"))]
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_other_seed_gives_other_data(run: tuple, tmp_path: Path) -> None:
    _generate(tmp_path, seed=1)
    events = _events(tmp_path)
    assert not events.equals(run[3])
    assert events["item_id"].to_pylist()[:50] != run[3]["item_id"].to_pylist()[:50]
    assert _items(tmp_path)["text"].to_pylist() != run[4]["text"].to_pylist()


def test_rows_do_not_depend_on_users_per_shard(run: tuple, tmp_path: Path) -> None:
    _generate(tmp_path, users_per_shard=333)
    assert len(_shards(tmp_path)) == 3 and len(_shards(run[0])) == 4
    assert _events(tmp_path).equals(run[3])
    assert _items(tmp_path).equals(run[4])


def test_schema_catalogue_and_prices(run: tuple) -> None:
    _, _, _, events, items = run
    for table, schema in ((events, EVENT_SCHEMA), (items, ITEM_SCHEMA)):
        assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in schema]  # Parquet
        composed = [f for f in schema if f.name != "item_text"]  # the generator composes its text
        assert all(table[f.name].null_count == 0 for f in composed)  # drops nullability; nothing is null
    assert items["item_text"].null_count == items.num_rows
    keys = list(zip(items["service"].to_pylist(), items["item_id"].to_pylist(), strict=True))
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 3 * SMALL["items_per_service"]
    price = {k: p for k, p in zip(keys, items["price"].to_pylist(), strict=True)}
    for row in events.to_pylist():
        assert (row["service"], row["item_id"]) in price
        assert row["price"] == price[(row["service"], row["item_id"])]
        assert row["event_type"] == "purchase" and row["quantity"] >= 1
    for row in items.to_pylist():
        department, category = row["categories"]
        assert row["text"].startswith(row["title"]) and f"brand {row['brand']}" in row["text"]
        assert category in row["text"] and row["price"] > 0


def test_whole_users_per_shard_sorted(run: tuple) -> None:
    out = run[0]
    shards = _shards(out)
    assert len(shards) == math.ceil(SMALL["num_users"] / SMALL["users_per_shard"])
    seen: set[str] = set()
    previous_last = ""
    for path in shards:
        users = pq.read_table(path, columns=["user"])["user"].to_pylist()
        assert users == sorted(users) and users[0] > previous_last
        assert len(set(users)) <= SMALL["users_per_shard"]
        assert not seen & set(users)
        seen |= set(users)
        previous_last = users[-1]


def test_splits_are_leave_one_out_per_user_and_service(run: tuple) -> None:
    _, _, _, events, _ = run
    rows = events.to_pylist()
    order = [(r["user"], r["service"]) for r in rows]
    assert order == sorted(order)  # grouped per user, services by name, each history contiguous
    lengths = Counter()
    for (_, _), history in _histories(events).items():
        n = len(history)
        lengths[min(n, 3)] += 1
        expected = ["train"] * n
        if n >= 2:
            expected[-1] = "test"
        if n >= 3:
            expected[-2] = "valid"
        assert [r["split"] for r in history] == expected
        assert [r["position"] for r in history] == list(range(n))
        times = [r["timestamp"] for r in history]
        assert all(a < b for a, b in zip(times, times[1:], strict=False))
    assert lengths[1] and lengths[2] and lengths[3]  # every split rule is exercised


def test_report_counts_every_row(run: tuple) -> None:
    _, events_report, items_report, events, items = run
    assert events_report.rows_read == events_report.rows_kept == events.num_rows
    assert items_report.rows_read == items_report.rows_kept == items.num_rows
    assert events_report.rows_rejected == 0
    one_event = sum(len(h) == 1 for h in _histories(events).values())
    assert events_report.notes["one_event_histories"] == one_event > 0


def test_services_subset_and_unknown_service(run: tuple, tmp_path: Path) -> None:
    _generate(tmp_path, services=["delivery", "grocery"])
    assert set(_events(tmp_path)["service"].to_pylist()) == {"delivery", "grocery"}
    items = _items(tmp_path)
    full = run[4]
    assert items.equals(full.filter(pa.compute.is_in(full["service"], pa.array(["delivery", "grocery"]))))
    with pytest.raises(DataError, match=r"'pharmacy'.*grocery.*marketplace.*delivery"):
        _generate(tmp_path / "bad", services=["grocery", "pharmacy"])


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share_two_services"):
        SyntheticConfig(share_two_services=0.8, share_three_services=0.5)
    with pytest.raises(ValueError, match="grocery_repeat_prob"):
        SyntheticConfig(grocery_repeat_prob=1.5)
    with pytest.raises(ValueError, match="num_topics"):
        _generate(tmp_path, num_topics=len(synthetic.TOPICS) + 1)


def test_users_use_one_to_three_services(run: tuple) -> None:
    services_of = defaultdict(set)
    for user, service in zip(run[3]["user"].to_pylist(), run[3]["service"].to_pylist(), strict=True):
        services_of[user].add(service)
    counts = Counter(len(s) for s in services_of.values())
    share = {k: counts[k] / len(services_of) for k in (1, 2, 3)}
    assert len(services_of) == SMALL["num_users"]
    n = len(services_of)
    assert share[2] == pytest.approx(0.35, abs=_share_tol(0.35, n))
    assert share[3] == pytest.approx(0.25, abs=_share_tol(0.25, n))


def test_taste_is_shared_across_services(run: tuple) -> None:
    """A user's topic mix in one service matches their mix in another far better than a stranger's."""
    _, _, _, events, items = run
    for a, b in (("grocery", "marketplace"), ("grocery", "delivery")):
        same, other, users = structure.taste_similarity(events, items, a, b)
        assert users > 100 and same > 0.7 and other < 0.25, (a, b, same, other)


@pytest.mark.parametrize("prob", [0.2, 0.8])
def test_grocery_repeat_rate_follows_the_config(prob: float, tmp_path: Path) -> None:
    _generate(tmp_path, num_users=300, grocery_repeat_prob=prob)
    hist = structure.histories(_events(tmp_path))
    assert structure.repeat_rate(hist, "grocery") == pytest.approx(
        prob, abs=_repeat_tol(hist, "grocery", prob)
    )


def test_repeat_rates_default(run: tuple) -> None:
    hist = structure.histories(run[3])
    grocery, marketplace = structure.repeat_rate(hist, "grocery"), structure.repeat_rate(hist, "marketplace")
    assert grocery == pytest.approx(0.45, abs=_repeat_tol(hist, "grocery", 0.45))
    assert marketplace < 0.1 and grocery > 4 * marketplace  # configured 0.03
    delivery = structure.repeat_rate(hist, "delivery")
    assert delivery == pytest.approx(0.25, abs=_repeat_tol(hist, "delivery", 0.25))


def test_popularity_is_heavy_tailed(run: tuple, tmp_path: Path) -> None:
    top10, top1 = structure.top_shares(run[3])
    _generate(tmp_path, zipf_exponent=0.0)  # the same run without Zipf: only topic popularity is left
    flat10, flat1 = structure.top_shares(_events(tmp_path))
    assert top10 > 0.33 and top1 > 0.07, (top10, top1)
    assert flat10 < 0.3 and flat1 < 0.055, (flat10, flat1)


def test_sessions_timestamps_and_interleaving(run: tuple) -> None:
    events = run[3]
    cfg = SyntheticConfig()
    by_user = defaultdict(list)
    for row in events.to_pylist():
        by_user[row["user"]].append((row["timestamp"], row["service"]))
    in_session, between, interleaved, multi = [], [], 0, 0
    for rows in by_user.values():
        rows.sort()
        gaps = np.diff([t for t, _ in rows])
        in_session += gaps[gaps < 3600].tolist()
        between += gaps[gaps >= 3600].tolist()
        services = [s for _, s in rows]
        if len(set(services)) > 1:
            multi += 1
            switches = sum(a != b for a, b in zip(services, services[1:], strict=False))
            interleaved += switches > len(set(services)) - 1  # came back to a service after another
    assert min(t for t, _ in rows) >= cfg.start_timestamp
    assert 60 < np.median(in_session) < 300  # minutes apart
    # a gap between sessions is 1 h + an exponential of mean (gap - 1) h, whose sd equals its mean:
    # 4 standard errors of the mean of the gaps seen
    spread = 4 * (cfg.session_gap_hours - 1) / math.sqrt(len(between))
    assert np.mean(between) / 3600 == pytest.approx(cfg.session_gap_hours, abs=spread)
    # sessions of 3 events on average hold 2 of every 3 gaps; a user's first event has no gap before
    # it, which lifts the share a little (measured 0.695)
    assert len(in_session) / (len(in_session) + len(between)) == pytest.approx(2 / 3, abs=0.05)
    assert interleaved / multi > 0.5


def test_text_recovers_topic_and_brands_are_per_service(run: tuple) -> None:
    """Title words learnt on half the catalogue name the topic of the other half."""
    rows = run[4].to_pylist()
    votes: dict[str, Counter] = defaultdict(Counter)
    for row in rows[::2]:
        for word in row["title"].lower().split():
            votes[word][row["categories"][0]] += 1
    hits = 0
    for row in rows[1::2]:
        tally = Counter()
        for word in row["title"].lower().split():
            tally.update({d: c / sum(votes[word].values()) for d, c in votes[word].items()})
        hits += tally.most_common(1)[0][0] == row["categories"][0]
    assert hits / len(rows[1::2]) > 0.95
    brands = defaultdict(set)
    for row in rows:
        brands[row["service"]].add(row["brand"])
    assert not (brands["grocery"] & brands["marketplace"] or brands["grocery"] & brands["delivery"])


def test_memory_is_bounded_by_the_block(tmp_path: Path) -> None:
    """Peak traced memory with small blocks is a fraction of one block holding every user."""
    peaks = {}
    for users_per_shard in (100, 1000):
        tracemalloc.start()
        _generate(tmp_path / str(users_per_shard), num_users=1000, users_per_shard=users_per_shard)
        peaks[users_per_shard] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(_shards(tmp_path / "100")) == 10
    assert peaks[100] < 0.25 * peaks[1000], peaks  # measured ~0.14
