"""Users held out of training for the membership-inference audit: the pick, and that their windows
go to the ``holdout`` split (and nowhere in ``train``) while their requests stay in valid / test."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from moe_rec.data import store
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.holdout import HOLDOUT_FILE, is_held_out, read_holdout_record
from moe_rec.data.prepare import prepare
from moe_rec.data.sequences import SequenceBuilder, SequenceConfig, user_bucket, write_sequences
from moe_rec.data.vocab import Vocabulary


def builder_for(data_dir: Path, cfg: SequenceConfig) -> SequenceBuilder:
    """A builder over the prepared catalogue: item i of a service gets codes (i % 8, i // 8 % 8, 0)."""
    items = store.load_table(data_dir, store.ITEMS_DIR)
    keys = sorted(zip(items["service"].to_pylist(), items["item_id"].to_pylist()))
    services = sorted({s for s, _ in keys})
    codes, index = {}, dict.fromkeys(services, 0)
    for s, i in keys:
        codes[s, i] = (index[s] % 8, index[s] // 8 % 8, 0)
        index[s] += 1
    return SequenceBuilder(Vocabulary(tuple(services), levels=2, codebook_size=8, dedup_size=2), codes, cfg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("holdout") / "data"
    prepare(
        DataConfig(
            source="synthetic", num_shards=2, synthetic=SyntheticConfig(num_users=60, items_per_service=40)
        ),
        out,
    )
    return out


def _rows(seq: Path, split: str) -> list[dict]:
    files = sorted(str(p) for p in (seq / split).glob("*.parquet"))
    return datasets.Dataset.from_parquet(files).to_list() if files else []


def test_the_pick_is_about_the_share_stable_and_not_the_router_bucket() -> None:
    users = [f"user{i}" for i in range(20000)]
    held = {u for u in users if is_held_out(u, 0.1)}
    assert 0.09 < len(held) / len(users) < 0.11
    assert held < {u for u in users if is_held_out(u, 0.2)}  # a larger share keeps the smaller one's
    assert not any(is_held_out(u, 0.0) for u in users[:100])
    buckets = [user_bucket(u, 10) for u in held]  # another hash: held-out users spread over buckets
    assert min(buckets.count(b) for b in range(10)) > 0.5 * len(held) / 10


def test_held_out_users_have_no_training_window_and_keep_their_requests(
    data_dir: Path, tmp_path: Path
) -> None:
    plain = write_sequences(data_dir, builder_for(data_dir, SequenceConfig()), tmp_path / "plain")
    counts = write_sequences(
        data_dir, builder_for(data_dir, SequenceConfig(holdout_users=0.2)), tmp_path / "held"
    )
    plain_train, train, holdout = (
        _rows(tmp_path / "plain", "train"),
        _rows(tmp_path / "held", "train"),
        _rows(tmp_path / "held", "holdout"),
    )
    held = {r["user"] for r in holdout}
    assert held and all(is_held_out(u, 0.2) for u in held)
    assert not held & {r["user"] for r in train}  # never trained on
    # the windows moved, unchanged: held-out users' windows are the holdout split, the rest is train
    assert sorted(map(json.dumps, holdout)) == sorted(json.dumps(r) for r in plain_train if r["user"] in held)
    assert sorted(map(json.dumps, train)) == sorted(
        json.dumps(r) for r in plain_train if r["user"] not in held
    )
    assert counts["train"] + counts["holdout"] == plain["train"]
    for split in ("valid", "test"):  # their requests are scored like anyone's
        assert _rows(tmp_path / "held", split) == _rows(tmp_path / "plain", split)
    assert read_holdout_record(tmp_path / "held") == {
        "share": 0.2,
        "users": len(held),
        "samples": len(holdout),
    }
    assert not any(u in (tmp_path / "held" / HOLDOUT_FILE).read_text() for u in held)  # counts only

    write_sequences(data_dir, builder_for(data_dir, SequenceConfig()), tmp_path / "held")  # share 0 again
    assert not _rows(tmp_path / "held", "holdout") and read_holdout_record(tmp_path / "held") is None
