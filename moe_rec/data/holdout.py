"""Users kept out of training, for the membership-inference audit (:mod:`moe_rec.eval.privacy_audit`).

``sequences.holdout_users: 0.1`` holds about 10 % of the users out of training entirely: a stable
hash of the user key picks them (the same on every machine and rerun, and independent of the
router's user buckets), ``sequences build`` writes no training window of theirs, and writes the
windows it would have written to ``<sequences>/holdout/`` instead (same columns as ``train/``),
which the trainer never reads. Their ``valid`` / ``test`` requests stay in those splits, so they
are scored like anyone's. The audit compares the model's loss on the training windows of members
(trained users) with the same on these windows of non-members: a model that memorises its users
tells the two apart.

``<sequences>/holdout_users.json`` records the share and how many users and windows were held
out; it names no user (the hash rule and the ``user`` column of ``holdout/`` identify them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

HOLDOUT_SPLIT = "holdout"
HOLDOUT_FILE = "holdout_users.json"


def is_held_out(user: str, share: float) -> bool:
    """Whether ``user`` is among the ``share`` of users kept out of training: a blake2b hash of
    ``holdout\\t<user>`` read as a number in [0, 1)."""
    if share <= 0.0:
        return False
    digest = hashlib.blake2b(f"holdout\t{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < share


def write_holdout_record(seq_dir: Path, share: float, users: int, samples: int) -> None:
    """Record the held-out share and counts (or remove a stale record when share is 0)."""
    path = Path(seq_dir) / HOLDOUT_FILE
    if share <= 0.0:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"share": share, "users": users, "samples": samples}) + "\n")


def read_holdout_record(seq_dir: Path) -> dict[str, Any] | None:
    """The record of a sequences directory's held-out users; None when it holds none out."""
    path = Path(seq_dir) / HOLDOUT_FILE
    return json.loads(path.read_text()) if path.exists() else None
