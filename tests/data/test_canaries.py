"""Planted canaries for the exposure audit: the patterns, their training windows and their record."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from moe_rec.data.canaries import (
    CANARY_FILE,
    CANARY_SHARD,
    CanaryConfig,
    is_canary_user,
    make_canaries,
    read_canaries,
)
from moe_rec.data.cold_start import is_cold
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.prepare import prepare
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import Event, SequenceConfig, write_sequences
from tests.data.test_holdout import builder_for

ITEMS = [(s, f"{s[0]}{i}") for s in ("grocery", "market") for i in range(30)]


def test_patterns_are_distinct_items_of_one_service_services_in_turn_and_reproducible() -> None:
    cfg = CanaryConfig(count=4, context_items=5, seed=3)
    planted, controls = make_canaries(ITEMS, cfg)
    assert (planted, controls) == make_canaries(reversed(ITEMS), cfg)  # a function of the config
    assert [c.service for c in planted] == [c.service for c in controls] == ["grocery", "market"] * 2
    for c in planted + controls:
        assert len(c.context) == 5 and len({*c.context, c.item}) == 6
        assert all((c.service, i) in ITEMS for i in (*c.context, c.item))
    assert not set(planted) & set(controls)
    assert make_canaries(ITEMS, CanaryConfig(count=4, seed=4))[0] != planted
    with pytest.raises(DataError, match="context_items"):
        make_canaries(ITEMS[:4], CanaryConfig(count=1, context_items=5))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("canaries") / "data"
    prepare(
        DataConfig(
            source="synthetic", num_shards=2, synthetic=SyntheticConfig(num_users=30, items_per_service=40)
        ),
        out,
    )
    return out


def test_planted_patterns_are_training_windows_of_their_own_users(data_dir: Path, tmp_path: Path) -> None:
    canaries = CanaryConfig(count=3, copies=4, context_items=5)
    cfg = SequenceConfig(train_stride=50, canaries=canaries, cold_items=0.2)
    builder = builder_for(data_dir, cfg)
    plain = write_sequences(
        data_dir, builder_for(data_dir, SequenceConfig(train_stride=50, cold_items=0.2)), tmp_path
    )
    counts = write_sequences(data_dir, builder, tmp_path)
    assert counts["train"] == plain["train"] + 3 * 4  # one window per synthetic user (6 events < stride)
    planted, controls = read_canaries(tmp_path)
    assert (planted, controls) == make_canaries(
        [k for k in builder.item_codes if not is_cold(*k, 0.2)], canaries
    )  # no cold item: its events would be left out of the window
    rows = datasets.Dataset.from_parquet(str(tmp_path / "train" / CANARY_SHARD)).to_list()
    assert len(rows) == 12 and all(is_canary_user(r["user"]) for r in rows)
    for p, canary in enumerate(planted):
        events = [
            Event(canary.service, i, None, k, "train") for k, i in enumerate((*canary.context, canary.item))
        ]
        expected = builder.encode(events, label_items=True)
        mine = [r for r in rows if r["user"].startswith(f"__canary__{p:04d}-")]
        assert len(mine) == 4 and all(r["input_ids"] == expected["input_ids"] for r in mine)
    others = datasets.Dataset.from_parquet([str(p) for p in (tmp_path / "train").glob("part-0*.parquet")])
    assert not any(is_canary_user(u) for u in others["user"])  # only the canary shard holds them

    write_sequences(data_dir, builder_for(data_dir, SequenceConfig(train_stride=50)), tmp_path)  # none again
    assert not (tmp_path / "train" / CANARY_SHARD).exists() and not (tmp_path / CANARY_FILE).exists()
