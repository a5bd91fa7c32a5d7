"""Privacy end to end on one tiny synthetic item-level run with held-out users and planted canaries
(``moe-rec run``): its bundle holds no raw user id and no history, ``moe-rec audit`` reports the
membership AUC and the canaries' exposure, and ``moe-rec data forget --config`` on the run leaves
no sample of the user in any split and names the checkpoints and bundle that still hold them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from moe_rec.cli import main
from moe_rec.data import store
from moe_rec.data.forget import find_strings
from moe_rec.data.sequences import iter_users, unified_order
from moe_rec.data.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"
TINY = [
    "data.synthetic.num_users=60", "data.synthetic.items_per_service=40", "data.num_shards=2",
    "sid.levels=2", "sid.codebook_size=8", "sid.max_dedup=64",
    "train.max_steps=6", "train.warmup_steps=2", "train.eval_every=3", "train.save_every=3",
    "train.micro_batch_size=8", "train.wandb.mode=disabled", "eval.batch_size=16",
    "sequences.holdout_users=0.3", "sequences.canaries.count=2", "sequences.canaries.copies=5",
]  # fmt: skip
SEPARATORS = [",", ", ", " ", "\t", "\n", "|", ";", '", "', '","', "', '", "','", "\x1f"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("private")
    assert (
        main(
            [
                "run",
                "--config",
                str(DEMO),
                f"run_dir={root}",
                f"sid.encoder.cache_dir={root / 'cache'}",
                *TINY,
            ]
        )
        == 0
    )
    return root


def _users(run_dir: Path) -> list[str]:
    return pc.unique(store.load_table(run_dir / "data")["user"]).to_pylist()


def _blobs(root: Path) -> dict[str, tuple[bytes, str]]:
    """Every file's raw bytes, and its text (Parquet decoded to JSON; other files as UTF-8, bad bytes replaced)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        text = raw.decode("utf-8", "replace")
        if path.suffix == ".parquet":
            text += json.dumps(pq.read_table(path).to_pylist(), default=str)
        out[path.relative_to(root).as_posix()] = (raw, text)
    return out


def _histories(run_dir: Path) -> list[list[str]]:
    """Every user's item ids in training's cross-service order, and every sample's first tokens."""
    events = store.load_table(run_dir / "data")
    services = sorted(pc.unique(events["service"]).to_pylist())
    return [[e.item_id for e in unified_order(evs, services)] for _, evs in iter_users(events)]


def _token_prefixes(run_dir: Path, vocab: Vocabulary) -> list[list[int]]:
    out = []
    for split in ("train", "valid", "test", "holdout"):
        for path in sorted((run_dir / "sequences" / split).glob("*.parquet")):
            for ids in pq.read_table(path, columns=["input_ids"])["input_ids"].to_pylist():
                if len(ids) >= 1 + 3 * vocab.tokens_per_item:
                    out.append(ids[: 1 + 3 * vocab.tokens_per_item])
    return out


def _leaks(bundle: Path, run_dir: Path) -> list[str]:
    """Every way a user's id or history could sit in ``bundle``: an id in any file's bytes or text
    (a plain substring search per id, independent of :func:`find_strings`), three consecutive items
    of a history joined by a separator, a sample's first three events as int32 / int64 tokens."""
    blobs = _blobs(bundle)
    vocab = Vocabulary.from_dict(json.loads((run_dir / "sequences" / "vocab.json").read_text()))
    found = []
    for user in _users(run_dir):
        found += [
            f"id {user} in {name}"
            for name, (raw, text) in blobs.items()
            if user.encode() in raw or user in text
        ]
    for history in _histories(run_dir):
        for i in range(len(history) - 2):
            triple = history[i : i + 3]
            if len(set(triple)) < 3:
                continue
            for sep in SEPARATORS:
                joined = sep.join(triple)
                found += [
                    f"history {joined!r} in {name}" for name, (_, text) in blobs.items() if joined in text
                ]
    for tokens in _token_prefixes(run_dir, vocab):
        for dtype in ("<i4", "<i8"):
            packed = np.asarray(tokens, dtype=dtype).tobytes()
            found += [
                f"tokens {tokens[:4]}... as {dtype} in {name}"
                for name, (raw, _) in blobs.items()
                if packed in raw
            ]
    return found


def test_the_bundle_holds_no_user_id_and_no_history(run_dir: Path, tmp_path: Path) -> None:
    bundle = run_dir / "bundle"
    assert (bundle / "manifest.json").exists()
    users = _users(run_dir)
    assert len(users) == 60
    assert _leaks(bundle, run_dir) == []
    assert find_strings(bundle, users) == {}
    # the checks do find what they look for: a copy of the bundle with one user's id, history and tokens
    leaky = tmp_path / "leaky"
    shutil.copytree(bundle, leaky)
    history = next(h for h in _histories(run_dir) if len(set(h[:3])) == 3)
    (leaky / "notes.json").write_text(json.dumps({"user": users[7], "history": history[:3]}))
    vocab = Vocabulary.from_dict(json.loads((run_dir / "sequences" / "vocab.json").read_text()))
    np.save(leaky / "probe.npy", np.asarray(_token_prefixes(run_dir, vocab)[0], dtype=np.int64))
    found = _leaks(leaky, run_dir)
    assert any(f.startswith(f"id {users[7]} in notes.json") for f in found)
    assert any(f.startswith("history") and "notes.json" in f for f in found)
    assert any(f.startswith("tokens") and "probe.npy" in f for f in found)
    assert find_strings(leaky, users) == {"notes.json": {users[7]}}


def test_the_audit_reports_membership_auc_and_canary_exposure(
    run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    args = ["--config", str(DEMO), f"run_dir={run_dir}", *TINY]
    assert main(["audit", *args, "--rounds", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((run_dir / "eval" / f"audit-{report['model']}.json").read_text())
    m = report["membership"]
    held = json.loads((run_dir / "sequences" / "holdout_users.json").read_text())
    assert m["non_members"] == held["users"] == m["members"] > 5
    for attack in ("loss", "rank"):
        low, high = m[attack]["ci95"]
        assert 0 <= low <= m[attack]["auc"] <= high <= 1
    for kind in ("planted", "controls"):
        e = report["canaries"][kind]
        assert e["count"] == 2 and all(0 <= x <= e["exposure_max"] + 1e-9 for x in e["exposures"])
        assert e["exposure_max"] == pytest.approx(math.log2(40))
    assert report["utility"]["split"] == "test" and 0 <= report["utility"]["ndcg@10"] <= 1


def test_an_audit_without_held_out_users_or_canaries_is_one_line(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("cache"))
    shutil.rmtree(copy / "sequences" / "holdout")
    (copy / "sequences" / "canaries.json").unlink()
    capsys.readouterr()
    assert main(["audit", "--config", str(DEMO), f"run_dir={copy}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "nothing to audit" in err and "sequences.holdout_users" in err


def test_forget_on_a_run_leaves_the_user_in_no_split_and_names_what_still_holds_them(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("cache"))
    args = ["--config", str(DEMO), f"run_dir={copy}", f"sid.encoder.cache_dir={run_dir / 'cache'}", *TINY]
    samples = {
        s: datasets.Dataset.from_parquet(str(copy / "sequences" / s / "*.parquet"))
        for s in ("train", "test", "holdout")
    }
    user = next(u for u in samples["train"]["user"] if u in set(samples["test"]["user"]))
    held = next(u for u in samples["holdout"]["user"])
    capsys.readouterr()
    assert main(["data", "forget", *args, "--user", user, "--user", held, "--rebuild-sequences"]) == 0
    out = capsys.readouterr().out
    assert "forgot 2 users" in out and "rebuilt" in out and "bundle" in out and "checkpoints/step_" in out
    assert (
        find_strings(copy, [user, held]) == {}
    )  # no file of the run names them now: data and sequences redone
    for split in ("train", "valid", "test", "holdout"):
        users = set(datasets.Dataset.from_parquet(str(copy / "sequences" / split / "*.parquet"))["user"])
        assert user not in users and held not in users and users
    assert (
        json.loads((copy / "sequences" / "holdout_users.json").read_text())["users"]
        == json.loads((run_dir / "sequences" / "holdout_users.json").read_text())["users"] - 1
    )
    assert main(["data", "forget", *args, "--user", user, "--json"]) == 0  # idempotent
    assert json.loads(capsys.readouterr().out)["users_already_forgotten"] == 1
