"""Sequences: token layout, sliding windows and the leave-one-out context rule, on hand-made histories."""

import pytest

from moe_rec.data.histories import EventBuilder
from moe_rec.data.schema import DataError, ReadReport
from moe_rec.data.sequences import IGNORE_INDEX, SequenceBuilder, SequenceConfig, build_samples, iter_users
from moe_rec.data.vocab import BOS, Vocabulary

VOCAB = Vocabulary(("a", "b"), levels=2, codebook_size=8, dedup_size=2)


def _codes(items: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, ...]]:
    return {key: (i % 8, (i // 8) % 8, i % 2) for i, key in enumerate(items)}


def _table(rows: list[tuple[str, str, str, int | None]]):
    b = EventBuilder(["a", "b"], None, ReadReport("test"))
    for n, (user, service, item, ts) in enumerate(rows):
        b.add(user, service, item, f"row{n}", timestamp=ts)
    return b.finish()


# user u: no timestamps (order only); user v: timestamps. Item ids name service and order.
ROWS = (
    [("u", "a", f"a{i}", None) for i in range(1, 5)]
    + [("u", "b", f"b{i}", None) for i in range(1, 4)]
    + [("v", "a", f"a@{t}", t) for t in (10, 20, 30, 40)]
    + [("v", "b", f"b@{t}", t) for t in (15, 35, 50)]
)
CODES = _codes(sorted({(s, i) for _, s, i, _ in ROWS}))
INVERSE = {(s, c): i for (s, i), c in CODES.items()}


def _items(sample: dict) -> list[str]:
    """Decode a sample's input back to item ids (every full item; a trailing service token is dropped)."""
    ids = sample["input_ids"]
    assert ids[0] == BOS
    body = ids[1:]
    n = VOCAB.tokens_per_item
    out = []
    for k in range(0, len(body) - len(body) % n, n):
        service, codes = VOCAB.decode_item(body[k : k + n])
        out.append(INVERSE[(service, codes)])
    return out


def _samples(split: str, **cfg) -> dict[tuple[str, str], list[dict]]:
    builder = SequenceBuilder(VOCAB, CODES, SequenceConfig(**cfg))
    out: dict[tuple[str, str], list[dict]] = {}
    for s in build_samples(_table(ROWS), builder, split):
        out.setdefault((s["user"], s["service"]), []).append(s)
    return out


def test_train_windows_follow_unified_order() -> None:
    # u: train events a1 a2 (a) and b1 (b); progress order a1(1/4) b1(1/3) a2(2/4)
    assert [_items(s) for s in _samples("train")[("u", "a")]] == [["a1", "b1", "a2"]]
    assert [_items(s) for s in _samples("train")[("u", "b")]] == [["a1", "b1"]]
    # v: by time a@10 b@15 a@20
    assert [_items(s) for s in _samples("train")[("v", "a")]] == [["a@10", "b@15", "a@20"]]
    assert [_items(s) for s in _samples("train")[("v", "b")]] == [["a@10", "b@15"]]


def test_labels_cover_item_codes_only() -> None:
    sample = _samples("train")[("u", "a")][0]
    ids, labels, domains = sample["input_ids"], sample["labels"], sample["domain_ids"]
    assert len(ids) == len(labels) == len(domains) == 1 + 3 * VOCAB.tokens_per_item
    for k, (t, lab) in enumerate(zip(ids, labels)):
        is_code = k > 0 and (k - 1) % VOCAB.tokens_per_item != 0
        assert lab == (t if is_code else IGNORE_INDEX)
    # every token of an event carries that event's service
    for k in range(1, len(ids)):
        event_start = 1 + ((k - 1) // VOCAB.tokens_per_item) * VOCAB.tokens_per_item
        assert domains[k] == VOCAB.services.index(VOCAB.token_name(ids[event_start])[5:-1])
    assert domains[0] == domains[1]


@pytest.mark.parametrize(
    "split, key, context, target",
    [
        ("test", ("u", "a"), ["a1", "b1", "a2", "a3"], "a4"),
        ("valid", ("u", "a"), ["a1", "b1", "a2"], "a3"),
        ("test", ("u", "b"), ["a1", "b1", "a2", "b2"], "b3"),
        ("valid", ("u", "b"), ["a1", "b1", "a2"], "b2"),
        ("test", ("v", "a"), ["a@10", "b@15", "a@20", "a@30"], "a@40"),
        ("test", ("v", "b"), ["a@10", "b@15", "a@20", "b@35"], "b@50"),
        ("valid", ("v", "b"), ["a@10", "b@15", "a@20"], "b@35"),
    ],
)
def test_eval_context_never_holds_other_services_held_out_items(split, key, context, target) -> None:
    (sample,) = _samples(split)[key]
    assert _items(sample) == context
    assert sample["input_ids"][-1] == VOCAB.service_token(key[1])
    assert sample["domain_ids"][-1] == VOCAB.service_index(key[1])
    assert sample["target_item"] == target
    assert tuple(sample["target"]) == CODES[(key[1], target)]


def test_history_cap_keeps_most_recent() -> None:
    (sample,) = _samples("test", max_events=2)[("u", "a")]
    assert _items(sample) == ["a2", "a3"]
    windows = [_items(s) for s in _samples("train", max_events=2)[("u", "a")]]
    assert windows == [["b1", "a2"]]
    strided = [_items(s) for ss in _samples("train", max_events=2, min_train_events=1).values() for s in ss]
    assert ["a1"] in strided


def _untimed(split: str, **cfg) -> dict[tuple[str, str], list[dict]]:
    """Samples of user u alone (no timestamps) with ``order: asked_last``."""
    builder = SequenceBuilder(VOCAB, CODES, SequenceConfig(order="asked_last", **cfg))
    out: dict[tuple[str, str], list[dict]] = {}
    for s in build_samples(_table([r for r in ROWS if r[0] == "u"]), builder, split):
        out.setdefault((s["user"], s["service"]), []).append(s)
    return out


def _labelled(sample: dict) -> list[str]:
    """The items of a training window whose codes are labels."""
    n = VOCAB.tokens_per_item
    return [item for k, item in enumerate(_items(sample)) if sample["labels"][1 + k * n + 1] != IGNORE_INDEX]


def test_asked_last_writes_each_service_after_the_others_and_labels_it_alone() -> None:
    train = _untimed("train", train_stride=50)
    # u's train events: a1 a2 (a), b1 (b); one window per service, each event labelled once
    assert [_items(s) for s in train[("u", "a")]] == [["b1", "a1", "a2"]]
    assert [_items(s) for s in train[("u", "b")]] == [["a1", "a2", "b1"]]
    assert [_labelled(s) for s in train[("u", "a")]] == [["a1", "a2"]]
    assert [_labelled(s) for s in train[("u", "b")]] == [["b1"]]
    # a window ends at every own event with stride 1
    assert [_items(s) for s in _untimed("train")[("u", "a")]] == [["b1", "a1", "a2"], ["b1", "a1"]]
    # the eval context: the other services' train events, then the service's own history
    assert _items(_untimed("test")[("u", "a")][0]) == ["b1", "a1", "a2", "a3"]
    assert _items(_untimed("test")[("u", "b")][0]) == ["a1", "a2", "b1", "b2"]
    assert _items(_untimed("valid")[("u", "b")][0]) == ["a1", "a2", "b1"]
    # the cap keeps the service's own latest events first (interleaved: a2 a3 / a2 b2)
    assert _items(_untimed("test", max_events=2)[("u", "a")][0]) == ["a2", "a3"]
    assert _items(_untimed("test", max_events=2)[("u", "b")][0]) == ["b1", "b2"]
    assert [_items(s) for s in _untimed("train", max_events=2)[("u", "b")]] == [["a2", "b1"]]


def test_asked_last_refuses_timed_histories_and_unknown_orders() -> None:
    builder = SequenceBuilder(VOCAB, CODES, SequenceConfig(order="asked_last"))
    with pytest.raises(DataError, match="user 'v'.*asked_last is for histories without timestamps"):
        list(build_samples(_table(ROWS), builder, "test"))
    with pytest.raises(ValueError, match="sequences.order must be one of"):
        SequenceConfig(order="blocked")


def test_unknown_item_is_a_clear_error() -> None:
    builder = SequenceBuilder(VOCAB, {}, SequenceConfig())
    with pytest.raises(DataError, match="a/a1 has no semantic ID"):
        list(build_samples(_table(ROWS), builder, "train"))


def test_iter_users_groups_whole_users() -> None:
    groups = list(iter_users(_table(ROWS)))
    assert [u for u, _ in groups] == ["u", "v"]
    assert [len(e) for _, e in groups] == [7, 7]


def test_user_bucket_is_stable_and_spread() -> None:
    import hashlib

    from moe_rec.data.sequences import user_bucket

    users = [f"user-{i}" for i in range(4000)]
    buckets = [user_bucket(u, 64) for u in users]
    # independent recomputation of the documented hash
    assert buckets[7] == int.from_bytes(hashlib.blake2b(b"user-7", digest_size=8).digest(), "little") % 64
    counts = [buckets.count(b) for b in range(64)]
    assert min(counts) > 30 and max(counts) < 100  # ~62 each


def test_write_sequences_counts_match_and_empty_splits_are_written(tmp_path) -> None:
    import datasets

    from moe_rec.data import store
    from moe_rec.data.sequences import write_sequences

    # shard 0: users u and v (full histories); shard 1: user w with one event -> no valid/test/train samples
    rows = ROWS + [("w", "a", "a1", None)]
    store.write_events(_table(rows), tmp_path / "data", num_shards=2)
    builder = SequenceBuilder(VOCAB, CODES, SequenceConfig())
    counts = write_sequences(tmp_path / "data", builder, tmp_path / "seq")
    for split in ("train", "valid", "test"):
        files = sorted((tmp_path / "seq" / split).glob("*.parquet"))
        assert [f.name for f in files] == ["part-00000.parquet"]  # shard 1 (user w) has no sample
        assert sum(len(datasets.Dataset.from_parquet(str(f))) for f in files) == counts[split]
    assert counts == {"train": 4, "valid": 4, "test": 4}  # u, v: 2 windows each; 2 services x 2 users
