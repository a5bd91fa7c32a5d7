"""Checkpoint pointers and validation: partial or corrupt checkpoints are errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_rec.train import checkpoint as ckpt


def _fake(tmp_path: Path, tag: str = "step_00000004", world_size: int = 2) -> Path:
    d = tmp_path / "checkpoints"
    (d / tag).mkdir(parents=True)
    (d / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    for r in range(world_size):
        (d / tag / f"rng_rank{r}.pt").write_bytes(b"y" * 5)
    ckpt.finish(d, tag, {"step": 4, "world_size": world_size})
    return d


def test_complete_checkpoint_verifies(tmp_path: Path) -> None:
    d = _fake(tmp_path)
    assert ckpt.resume_tag(d) == "step_00000004"
    assert ckpt.verify(d, "step_00000004", world_size=2)["step"] == 4


def test_fresh_run_has_nothing_to_resume(tmp_path: Path) -> None:
    assert ckpt.resume_tag(tmp_path / "checkpoints") is None


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda t: (t / "rng_rank1.pt").unlink(), r"partial checkpoint, rng_rank1\.pt is missing"),
        (
            lambda t: (t / "mp_rank_00_model_states.pt").write_bytes(b"x"),
            r"mp_rank_00_model_states\.pt is 1 bytes",
        ),
        (lambda t: (t / ckpt.STATE_FILE).unlink(), r"partial checkpoint, trainer_state\.json is missing"),
        (lambda t: (t / ckpt.STATE_FILE).write_text("{"), r"trainer_state\.json: unreadable"),
    ],
    ids=["missing-file", "truncated-file", "no-state", "bad-state"],
)
def test_damaged_checkpoint_is_an_error(tmp_path: Path, damage, match: str) -> None:
    d = _fake(tmp_path)
    damage(d / "step_00000004")
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.verify(d, ckpt.resume_tag(d), world_size=2)


def test_bad_pointers_are_errors(tmp_path: Path) -> None:
    d = _fake(tmp_path)
    (d / ckpt.LATEST).write_text("step_00000099")
    with pytest.raises(ckpt.CheckpointError, match=r"points at 'step_00000099'.*does not exist"):
        ckpt.verify(d, ckpt.resume_tag(d), world_size=2)
    (d / ckpt.LATEST).write_text("")
    with pytest.raises(ckpt.CheckpointError, match="empty checkpoint pointer"):
        ckpt.resume_tag(d)
    (d / ckpt.LATEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoints but no 'latest' pointer"):
        ckpt.resume_tag(d)


def test_other_world_size_is_an_error(tmp_path: Path) -> None:
    d = _fake(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks; resuming with 4"):
        ckpt.verify(d, "step_00000004", world_size=4)


def test_prune_keeps_last_k_and_best(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (d / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.finish(d, ckpt.tag_for(step), {"step": step})
    ckpt.write_pointer(d, ckpt.BEST, ckpt.tag_for(2))
    ckpt.prune(d, keep_last=2)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == [
        "step_00000002",
        "step_00000006",
        "step_00000008",
    ]
    assert json.loads((d / "step_00000008" / ckpt.STATE_FILE).read_text())["step"] == 8
