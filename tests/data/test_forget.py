"""``forget_users`` and ``moe-rec data forget``: a forgotten user has no event left in any split or
shard, the counts and the log say what went, a second run changes nothing, an id never seen is an
error naming it (and changes nothing), a re-prepare of a source that still holds the user drops
them again, and the log holds no raw id."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from moe_rec.cli import main
from moe_rec.data import store
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.forget import KEY_FILE, LOG_FILE, forget_users, invalidate_sequences
from moe_rec.data.prepare import prepare
from moe_rec.data.schema import DataError


def _config() -> DataConfig:
    return DataConfig(
        source="synthetic", num_shards=3, synthetic=SyntheticConfig(num_users=40, items_per_service=40)
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    prepare(_config(), tmp_path / "run" / "data")
    return tmp_path / "run" / "data"


def _events(data_dir: Path) -> list[dict]:
    return store.load_table(data_dir).to_pylist()


def _snapshot(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


def test_forget_removes_every_event_of_the_users_and_counts_them(data_dir: Path) -> None:
    before = _events(data_dir)
    users = sorted({r["user"] for r in before})
    gone = [users[3], users[17]]  # in different shards
    expected = {u: {} for u in gone}
    for r in before:
        if r["user"] in gone:
            expected[r["user"]][r["service"]] = expected[r["user"]].get(r["service"], 0) + 1
    result = forget_users(data_dir, gone)
    assert result.forgotten == {u: dict(sorted(expected[u].items())) for u in gone}
    after = _events(data_dir)
    assert not [r for r in after if r["user"] in gone]  # no split of any shard holds them
    assert {split for r in before if r["user"] in gone for split in [r["split"]]} >= {"train", "test"}
    assert after == [r for r in before if r["user"] not in gone]  # everyone else exactly as before
    stats = store.read_stats(data_dir)
    assert stats["total"]["users"] == len(users) - 2
    assert stats["total"]["interactions"] == len(after)
    assert stats["forgotten"] == {"users": 2, "events": result.events}
    assert stats["reports"]["events"]["rows_kept"] - stats["forgotten"]["events"] == len(after)
    log = [json.loads(line) for line in (data_dir / LOG_FILE).read_text().splitlines()]
    assert [r["events"] for r in log] == [sum(expected[u].values()) for u in gone]
    assert not list(data_dir.rglob(".*.tmp"))


def test_forgetting_again_is_reported_and_changes_nothing(data_dir: Path) -> None:
    user = _events(data_dir)[0]["user"]
    first = forget_users(data_dir, [user])
    snapshot = _snapshot(data_dir)
    second = forget_users(data_dir, [user])
    assert first.events > 0 and second.events == 0 and not second.forgotten
    assert second.already == {user: first.time}
    assert _snapshot(data_dir) == snapshot  # idempotent: not even the log grew


def test_an_unknown_user_is_an_error_naming_it_and_nothing_changes(data_dir: Path) -> None:
    known = _events(data_dir)[0]["user"]
    forget_users(data_dir, [_events(data_dir)[-1]["user"]])  # a log exists: unknown still means never seen
    snapshot = _snapshot(data_dir)
    with pytest.raises(DataError) as error:
        forget_users(data_dir, [known, "nobody-1", "nobody-2"])
    assert "'nobody-1', 'nobody-2'" in str(error.value) and "nothing was changed" in str(error.value)
    assert repr(known) not in str(error.value)
    assert _snapshot(data_dir) == snapshot  # the known user was not removed either


def test_the_log_holds_no_raw_id(data_dir: Path) -> None:
    users = sorted({r["user"] for r in _events(data_dir)})[:5]
    forget_users(data_dir, users)
    text = (data_dir / LOG_FILE).read_text() + (data_dir / store.STATS_FILE).read_text()
    assert not [u for u in users if u in text]
    assert oct((data_dir / KEY_FILE).stat().st_mode & 0o777) == "0o600"


def test_a_fresh_prepare_drops_forgotten_users_again(data_dir: Path) -> None:
    user = _events(data_dir)[5]["user"]
    forget_users(data_dir, [user])
    stats = prepare(_config(), data_dir)  # the synthetic source generates the user again
    assert user not in {r["user"] for r in _events(data_dir)}
    assert stats["forgotten"]["users"] == 1 and stats["forgotten"]["events"] > 0
    assert forget_users(data_dir, [user]).already  # still known as forgotten


def test_forgetting_every_user_is_refused(data_dir: Path) -> None:
    users = pc.unique(store.load_table(data_dir)["user"]).to_pylist()
    with pytest.raises(DataError, match="all 40 users"):
        forget_users(data_dir, users)


def test_invalidate_sequences_removes_samples_and_the_stamp_only(tmp_path: Path) -> None:
    seq = tmp_path / "sequences"
    for name in ("train/part-00000.parquet", "holdout/part-00000.parquet", "stage.json", "vocab.json",
                 "cold_items.json", "holdout_users.json"):  # fmt: skip
        (seq / name).parent.mkdir(parents=True, exist_ok=True)
        (seq / name).write_text("x")
    removed = invalidate_sequences(seq)
    assert {p.relative_to(seq).as_posix() for p in removed} == {
        "train/part-00000.parquet", "holdout/part-00000.parquet", "stage.json", "holdout_users.json"
    }  # fmt: skip
    assert sorted(p.name for p in seq.iterdir() if p.is_file()) == ["cold_items.json", "vocab.json"]


def test_the_command_forgets_reports_and_warns(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    run = data_dir.parent
    (run / "sequences" / "train").mkdir(parents=True)
    (run / "sequences" / "train" / "part-00000.parquet").write_text("stale")
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "model.pt").write_text("weights")
    users = sorted({r["user"] for r in _events(data_dir)})
    users_file = run / "users.txt"
    users_file.write_text(f"{users[1]}\n\n  {users[2]}  \n")
    assert (
        main(["data", "forget", "--data", str(data_dir), "--user", users[0], "--users-file", str(users_file)])
        == 0
    )
    out = capsys.readouterr().out
    assert "forgot 3 users" in out and "checkpoints/step_00000010" in out and "retrain" in out
    assert not (run / "sequences" / "train" / "part-00000.parquet").exists()
    assert not {users[0], users[1], users[2]} & {r["user"] for r in _events(data_dir)}

    assert main(["data", "forget", "--data", str(data_dir), "--user", users[0], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users_forgotten"] == 0 and report["users_already_forgotten"] == 1

    assert main(["data", "forget", "--data", str(data_dir), "--user", "ghost"]) == 2
    err = capsys.readouterr().err
    assert "'ghost'" in err and len(err.strip().splitlines()) == 1


def test_invalidate_critiques_removes_both_directories_files(tmp_path: Path) -> None:
    from moe_rec.data.forget import invalidate_critiques

    names = [
        "critiques/train.parquet",
        "critiques/stats.json",
        "critiques/stage.json",
        "narratives/test.parquet",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "sequences").mkdir()
    (tmp_path / "sequences" / "vocab.json").write_text("x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in invalidate_critiques(tmp_path)) == sorted(names)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["vocab.json"]
    assert invalidate_critiques(tmp_path) == []
