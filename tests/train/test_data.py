"""Sharding of the train split over ranks, the collator, and clear errors for configs and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moe_rec.config import ConfigError
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.vocab import PAD
from moe_rec.train import train
from moe_rec.train.data import Collator, DataPosition, ShardedTrainData, load_split
from tests.train.conftest import tiny_config


def _shards(run_dir: Path, world: int, **kw: int) -> list[ShardedTrainData]:
    ds = load_split(run_dir / "sequences", "train")
    args = dict(micro_batch_size=4, grad_accum=2, seed=0) | kw
    return [
        ShardedTrainData(ds, rank=r, world_size=world, collator=Collator(64), **args) for r in range(world)
    ]


def test_ranks_see_disjoint_samples_and_run_the_same_steps(run_dir: Path) -> None:
    shards = _shards(run_dir, world=3)
    assert len({s.steps_per_epoch for s in shards}) == 1
    assert shards[0].steps_per_epoch == 96 // (3 * 4 * 2)
    seen = [np.concatenate([s._order(0)[st * 24 : (st + 1) * 24].reshape(2, 3, 4)[:, s.rank].ravel()
                            for st in range(s.steps_per_epoch)]) for s in shards]  # fmt: skip
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist())) == 96  # every sample once per epoch, on one rank


def test_order_is_deterministic_per_epoch_and_resumes_exactly(run_dir: Path) -> None:
    a, b = _shards(run_dir, world=2)[0], _shards(run_dir, world=2)[0]
    assert not np.array_equal(a._order(0), a._order(1))
    stream = a(DataPosition())
    steps = [next(stream) for _ in range(9)]  # crosses the epoch boundary (6 steps per epoch)
    assert steps[5][0] == DataPosition(0, 6) and steps[6][0] == DataPosition(1, 1)
    pos, _ = steps[3]
    resumed = b(pos)
    for (p, batches), (q, again) in zip(steps[4:], (next(resumed) for _ in range(5))):
        assert p == q
        for x, y in zip(batches, again):
            torch.testing.assert_close(x, y)


def test_collator_right_pads_and_hashes_users(run_dir: Path) -> None:
    ds = load_split(run_dir / "sequences", "train")
    rows = [ds[0], ds[1], ds[2]]
    batch = Collator(64)(rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert (batch["input_ids"][i, n:] == PAD).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["domain_ids"][i, n:] == r["domain_ids"][-1]).all()
        assert batch["attention_mask"][i].sum().item() == n
        assert batch["user_ids"][i].item() == user_bucket(r["user"], 64)


def test_world_size_the_data_cannot_feed_is_an_error(run_dir: Path) -> None:
    with pytest.raises(DataError, match=r"96 samples.*world_size 16 x micro_batch_size 4"):
        _shards(run_dir, world=16)


def test_config_typo_names_the_key(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.micro_batchsize.*did you mean 'train\.micro_batch_size'"):
        tiny_config(run_dir, "train.micro_batchsize=4")
    with pytest.raises(ConfigError, match=r"train\.resume.*must be one of"):
        tiny_config(run_dir, "train.resume=sometimes")


def test_missing_sequences_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"vocab\.json not found: no sequences"):
        train(tiny_config(tmp_path / "empty"))


def test_cli_reports_a_config_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_rec.train.__main__ import main

    assert main(["--config", "configs/experiments/demo.yaml", f"run_dir={run_dir}", "train.lr=fast"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err
