"""The moe-rec CLI end to end on a tiny synthetic run, and its one-line errors (exit code 2); its
results on stdout (``--json``: one document), an item-level run trained in two starts with W&B
offline and evaluated by a separate ``moe-rec eval`` process (predictions, metrics.jsonl, W&B)."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from moe_rec.cli import main, parse
from moe_rec.data.vocab import Vocabulary
from moe_rec.experiment import ExperimentConfig
from moe_rec.sid.table import SIDTable
from tests.eval.recompute import from_predictions
from tests.train.conftest import PLAIN_ITEM_MODEL, tiny_config, wandb_records, write_sequences

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"
TINY = [
    "data.synthetic.num_users=60",
    "data.synthetic.items_per_service=40",
    "data.num_shards=2",
    "sid.levels=2",
    "sid.codebook_size=8",
    "sid.max_dedup=64",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.save_every=3",
    "train.micro_batch_size=8",
    "train.wandb.mode=disabled",
    "eval.max_samples=30",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    args = [f"run_dir={root}", f"sid.encoder.cache_dir={root / 'cache'}", *TINY]
    assert main(["run", *args]) == 0
    return root


def test_run_writes_every_stage(run_dir: Path) -> None:
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert set(stats["services"]) == {"grocery", "marketplace", "delivery"}
    assert stats["reports"]["events"]["rows_kept"] == stats["total"]["interactions"]
    sid_stats = json.loads((run_dir / "sids" / "stats.json").read_text())
    table = SIDTable.load(run_dir / "sids")
    assert sid_stats["items"] == sid_stats["unique_ids"] == len(table) == stats["total"]["items"]
    vocab = Vocabulary.from_dict(json.loads((run_dir / "sequences" / "vocab.json").read_text()))
    assert (vocab.levels, vocab.codebook_size) == (2, 8)
    test = datasets.Dataset.from_parquet(str(run_dir / "sequences" / "test" / "*.parquet"))
    assert len(test) == sum(s["splits"].get("test", 0) for s in stats["services"].values())
    for row in test.select(range(min(20, len(test)))):
        assert row["input_ids"][-1] == vocab.service_token(row["service"])  # ends asking for the service
        codes = table.codes_for(row["service"], [row["target_item"]])[0].tolist()
        assert row["target"] == codes
        assert all(0 <= t < vocab.size for t in row["input_ids"])
    assert (run_dir / "config.yaml").exists()


def test_run_trains_and_its_checkpoint_loads(run_dir: Path) -> None:
    import torch

    from moe_rec.train.checkpoint import load_model

    lines = [
        json.loads(line) for line in (run_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [m["step"] for m in lines if "train/loss" in m]
    assert steps and max(steps) == 6
    assert any("valid/exact_match" in m for m in lines)
    model = load_model(run_dir / "checkpoints", "latest")
    assert not model.training  # loaded to rank or write: no dropout (the narratives evaluation had it)
    vocab = Vocabulary.from_dict(json.loads((run_dir / "sequences" / "vocab.json").read_text()))
    assert model.config.vocab_size == vocab.size and model.config.num_domains == vocab.service_slots
    test = datasets.Dataset.from_parquet(str(run_dir / "sequences" / "test" / "*.parquet"))
    row = test[0]
    ids = torch.tensor([row["input_ids"]])
    logits = model(ids, torch.tensor([row["domain_ids"]]), torch.zeros(1, dtype=torch.long)).logits
    assert logits.shape == (1, ids.shape[1], vocab.size) and torch.isfinite(logits).all()


def test_run_ends_with_an_evaluation_report(run_dir: Path) -> None:
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    report = json.loads((run_dir / "eval" / f"test-{best}.json").read_text())
    metrics = report["metrics"]
    assert metrics["test/count"] == 30
    for k in (5, 10, 20):
        assert 0.0 <= metrics[f"test/ndcg@{k}"] <= metrics[f"test/recall@{k}"] <= 1.0
    assert metrics["test/recall@5"] <= metrics["test/recall@10"] <= metrics["test/recall@20"]
    per_service = [s for s in ("grocery", "marketplace", "delivery") if f"test/{s}/count" in metrics]
    assert sum(metrics[f"test/{s}/count"] for s in per_service) == 30


def test_popularity_baseline_through_the_cli(run_dir: Path) -> None:
    assert main(["eval", f"run_dir={run_dir}", *TINY, "--baseline", "popularity"]) == 0
    report = json.loads((run_dir / "eval" / "test-popularity.json").read_text())
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert report["metrics"]["test/count"] == sum(
        s["splits"].get("test", 0) for s in stats["services"].values()
    )


def test_run_ends_with_a_bundle_that_recommends(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import pyarrow.compute as pc

    from moe_rec.data import store
    from moe_rec.serve import Recommender

    bundle = run_dir / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["tag"] == (run_dir / "checkpoints" / "best").read_text().strip()
    assert manifest["verification"]["passed"]
    events = store.load_table(run_dir / "data")
    train = events.filter(pc.equal(events["split"], "train"))
    first = train.filter(pc.equal(train["service"], "delivery")).slice(0, 2).to_pylist()
    history = [f"{e['service']}:{e['item_id']}" for e in first]
    seen = {e["item_id"] for e in first}
    every = 40  # TINY: every delivery item, so what exclusion removes is exactly the history's items
    capsys.readouterr()
    argv = ["recommend", str(bundle), "--service", "delivery", "--k", str(every), "--history", *history]
    assert main(argv) == 0

    def rows() -> str:  # the table's rows (on the console, stderr); its title repeats the history
        return "\n".join(line for line in "".join(capsys.readouterr()).splitlines() if line.startswith("│"))

    out = rows()
    assert main([*argv, "--no-exclude-seen"]) == 0
    out_with_seen = rows()
    with Recommender.from_bundle(bundle) as rec:  # the same answers straight from the Python API
        pairs = [tuple(h.split(":")) for h in history]
        want = rec.recommend(pairs, "delivery", k=every)
        want_with_seen = rec.recommend(pairs, "delivery", k=every, exclude_seen=False)
    assert len(want) == every - len(seen) and all(r.item_id in out for r in want)
    assert len(want_with_seen) == every and all(r.item_id in out_with_seen for r in want_with_seen)
    assert not any(i in out for i in seen) and all(i in out_with_seen for i in seen)
    assert main([*argv[:-1], "delivery:no-such-item"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and "no-such-item" in err and "Traceback" not in err


def test_eval_of_the_fp32_bundle_equals_eval_of_its_checkpoint(run_dir: Path) -> None:
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    assert main(["eval", f"run_dir={run_dir}", *TINY, "--bundle", str(run_dir / "bundle")]) == 0
    from_bundle = json.loads((run_dir / "eval" / f"test-bundle-{best}-float32.json").read_text())
    from_checkpoint = json.loads((run_dir / "eval" / f"test-{best}.json").read_text())
    assert from_bundle["metrics"] == from_checkpoint["metrics"]


def test_data_stats_prints_json(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "stats", str(run_dir / "data"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["users"] == 60


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "prepare", "data.sorce=synthetic"], "unknown key 'data.sorce'"),
        (["data", "prepare", "data.source=amazon2014", "data.path=/nonexistent/amazon"], "not found"),
        (["data", "stats", "/nonexistent/run/data"], "no stats.json"),
        (["sids", "build", "run_dir=/nonexistent/run"], "moe-rec data prepare"),
        (["sequences", "build", "run_dir=/nonexistent/run"], "sid_table"),
        (["sequences", "build", "run_dir=/nonexistent/run"], "`moe-rec sids build"),
        (["train", "run_dir=/nonexistent/run"], "`moe-rec sequences build"),
        (["train", "run_dir=/nonexistent/run", "model.overrides.num_expert=6"], "did you mean"),
        (["critiques", "build", "run_dir=/nonexistent/run"], "moe-rec data prepare"),
        (["critiques", "build", "critiques.held_out_families=[nope]"], "unknown famil"),
        (["critiques", "stats", "/nonexistent/run/critiques"], "moe-rec critiques build"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_corrupt_sid_table_is_refused(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    parquet = copy / "sids" / "sid_table.parquet"
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parquet.write_bytes(bytes(data))
    assert main(["sequences", "build", f"run_dir={copy}", *TINY]) == 2
    assert "checksum" in " ".join(capsys.readouterr().err.split())


def test_strict_failure_names_the_row_and_keeps_earlier_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "events.csv").write_text(
        "user,service,item_id,timestamp\nu1,shop,a,100\nu1,shop,b,200\nu1,shop,c,300\nu2,shop,a,oops\n"
    )
    (tmp_path / "items.jsonl").write_text(
        "\n".join(json.dumps({"service": "shop", "item_id": i, "title": f"item {i}"}) for i in "abc") + "\n"
    )
    args = [
        f"run_dir={tmp_path / 'run'}",
        "data.source=files",
        f"data.files.events=[{tmp_path / 'events.csv'}]",
        f"data.files.catalogue=[{tmp_path / 'items.jsonl'}]",
    ]
    assert main(["data", "prepare", *args]) == 0  # lenient: the bad row is counted, the rest kept
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["reports"]["events"]["rows_read"] == 4 and stats["reports"]["events"]["rows_kept"] == 3
    before = sorted(p.name for p in (tmp_path / "run" / "data" / "events").iterdir())
    capsys.readouterr()
    assert main(["data", "prepare", *args, "data.strict=true"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "events.csv:5" in err
    assert sorted(p.name for p in (tmp_path / "run" / "data" / "events").iterdir()) == before


# --- recommend and serve on the tiny serving bundle ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.serve.conftest import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.mark.parametrize("unseen", [3, 0])
def test_recommend_when_the_history_covers_most_of_the_service(
    tiny_bundle: Path, unseen: int, capsys: pytest.CaptureFixture
) -> None:
    """All but ``unseen`` grocery items in the history, k=5: every unseen item is shown, with a line
    saying there are no more; no traceback."""
    from tests.serve.conftest import ITEMS_PER_SERVICE

    items = [f"grocery-{i}" for i in range(ITEMS_PER_SERVICE)]
    seen, left = items[unseen:], items[:unseen]
    argv = ["recommend", str(tiny_bundle), "--service", "grocery", "--k", "5", "--history"]
    capsys.readouterr()
    assert main([*argv, *(f"grocery:{i}" for i in seen)]) == 0
    out = "".join(capsys.readouterr())
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert sorted(line.split("│")[2].strip() for line in rows) == sorted(left)
    assert f"only {unseen} items of grocery are left" in " ".join(out.split())
    assert "Traceback" not in out


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_with_an_invalid_port_is_one_line_and_exit_2(
    tiny_bundle: Path, port: str, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["serve", str(tiny_bundle), "--port", port, "--device", "cpu"]) == 2
    lines = [line for line in "".join(capsys.readouterr()).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert f"port {port} is invalid" in lines[0] and "1..65535" in lines[0]


@pytest.mark.parametrize("flag", ["--max-batch-size", "--max-k", "--max-body-bytes", "--torch-threads"])
def test_serve_with_a_size_below_one_is_one_line_and_exit_2(
    tiny_bundle: Path, flag: str, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    assert main(["serve", str(tiny_bundle), flag, "0"]) == 2
    lines = [line for line in "".join(capsys.readouterr()).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "must be >= 1" in lines[0], lines


@pytest.mark.slow  # a whole `moe-rec serve` process imports torch: ~8-10 s
def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tiny_bundle: Path) -> None:
    """A whole ``moe-rec serve`` process: its entire output is the one error line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "moe_rec.cli", "serve", str(tiny_bundle), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0]


def _copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, [f"run_dir={copy}", *TINY]


def _one_error(capsys: pytest.CaptureFixture) -> str:
    """The one error message on stderr, without whitespace (the console wraps long paths anywhere)."""
    err = "".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


def _compact(text: object) -> str:
    return "".join(str(text).split())


def test_truncated_catalogue_shard_is_named(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy, args = _copy_run(run_dir, tmp_path)
    items = copy / "data" / "items" / "part-00000.parquet"
    items.write_bytes(items.read_bytes()[: items.stat().st_size // 2])  # as an interrupted copy leaves it
    capsys.readouterr()
    assert main(["sids", "build", *args, f"sid.encoder.cache_dir={copy / 'cache'}"]) == 2
    err = _one_error(capsys)
    assert _compact(items) in err and _compact("re-run `moe-rec data prepare`") in err
    assert main(["export", *args, "--overwrite"]) == 2
    err = _one_error(capsys)
    assert _compact(items) in err and _compact("re-run `moe-rec data prepare`") in err


def test_damaged_trainer_state_is_named(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy, args = _copy_run(run_dir, tmp_path)
    state = copy / "checkpoints" / (copy / "checkpoints" / "best").read_text().strip() / "trainer_state.json"
    state.write_text(state.read_text()[:20])
    capsys.readouterr()
    assert main(["export", *args, "--overwrite"]) == 2
    assert _compact(f"{state}: damaged checkpoint file") in _one_error(capsys)


def test_prepare_that_rejects_every_row_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "events.csv").write_text("user,service,item_id,timestamp\nu1,shop,a,100\nu1,shop,b,200\n")
    (tmp_path / "items.jsonl").write_text(
        "\n".join(json.dumps({"service": "shop", "item_id": i, "title": f"item {i}"}) for i in "ab") + "\n"
    )
    args = [
        f"run_dir={tmp_path / 'run'}",
        "data.source=files",
        f"data.files.events=[{tmp_path / 'events.csv'}]",
        f"data.files.catalogue=[{tmp_path / 'items.jsonl'}]",
        "data.files.timestamp_unit=iso",  # the files hold unix seconds
    ]
    assert main(["data", "prepare", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "all 2 rows were rejected (bad_timestamp 2)" in err and "timestamp_unit" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "data" / "events").exists()


def test_a_rerun_skips_the_stages_whose_inputs_did_not_change(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from moe_rec import stages
    from moe_rec.config import load_config

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    args = [f"run_dir={copy}", f"sid.encoder.cache_dir={tmp_path / 'elsewhere'}", *TINY]
    made = {d: (copy / d / stages.STAMP_FILE).stat().st_mtime_ns for d in ("data", "sids", "sequences")}
    capsys.readouterr()
    assert main(["run", *args]) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    for d in ("data", "sids", "sequences"):
        assert f"{copy / d}: made by the same config and inputs; skipped" in out
        assert (copy / d / stages.STAMP_FILE).stat().st_mtime_ns == made[d]  # not rewritten
    assert "test: the model beside the most popular items" in out
    # a changed quantiser invalidates the IDs and the sequences spelled with them, not the data
    cfg = load_config(ExperimentConfig, None, [*args, "sid.kmeans.iters=3"])
    assert stages.read(copy / "data") == stages.data_print(cfg)
    assert stages.read(copy / "sids") != stages.sids_print(cfg, cfg.data_dir)
    (copy / "sids" / stages.STAMP_FILE).write_text('{"fingerprint": "other"}')
    assert stages.read(copy / "sequences") != stages.sequences_print(cfg)  # follows the IDs' stamp


# --- results on stdout, --json, and what goes to stderr ------------------------------------------


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of rich tables in ``text``, as cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_recommend_prints_results_on_stdout_and_json_on_request(
    tiny_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    from moe_rec.serve import Recommender

    history = ["grocery:grocery-1", "market:market-2", "grocery:grocery-3"]
    argv = ["recommend", str(tiny_bundle), "--service", "grocery", "--k", "5", "--history", *history]
    with Recommender.from_bundle(tiny_bundle) as rec:  # the same request straight through the Python API
        want = rec.recommend([tuple(h.split(":")) for h in history], "grocery", k=5)
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    out, _ = capsys.readouterr()
    found = json.loads(out)  # all of stdout is one document
    assert [(r["rank"], r["item_id"]) for r in found["items"]] == [
        (i + 1, w.item_id) for i, w in enumerate(want)
    ]
    assert [r["score"] for r in found["items"]] == pytest.approx([w.score for w in want])
    assert [r["fields"] for r in found["items"]] == [w.fields for w in want]
    assert (found["service"], found["history"], found["available"]) == ("grocery", history, 50 - 2)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert [row[1] for row in _table_rows(out)] == [w.item_id for w in want]
    assert _table_rows(err) == []


def test_data_stats_prints_results_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--json`` is stats.json; its counts are those of the prepared events; the table goes to stdout."""
    from moe_rec.data import store

    (tmp_path / "events.csv").write_text(
        "user,service,item_id,timestamp\nu1,shop,a,1\nu1,shop,b,2\nu1,cafe,x,3\nu2,shop,a,4\nu2,shop,c,5\n"
    )
    (tmp_path / "items.jsonl").write_text(
        "\n".join(json.dumps({"service": s, "item_id": i, "title": f"{s} {i}"}) for s, i in
                  [("shop", "a"), ("shop", "b"), ("shop", "c"), ("cafe", "x")]) + "\n"
    )  # fmt: skip
    run = tmp_path / "run"
    args = [f"run_dir={run}", "data.source=files", f"data.files.events=[{tmp_path / 'events.csv'}]",
            f"data.files.catalogue=[{tmp_path / 'items.jsonl'}]"]  # fmt: skip
    assert main(["data", "prepare", *args]) == 0
    capsys.readouterr()
    assert main(["data", "stats", str(run / "data"), "--json"]) == 0
    out, _ = capsys.readouterr()
    stats = json.loads(out)
    events = store.load_table(run / "data").to_pylist()
    for service in ("shop", "cafe"):
        mine = [e for e in events if e["service"] == service]
        got = stats["services"][service]
        assert got["users"] == len({e["user"] for e in mine}) and got["items"] == len(
            {e["item_id"] for e in mine}
        )
        assert got["interactions"] == len(mine)
    assert stats["total"]["users"] == 2 and stats["total"]["users_in_several_services"] == 1
    assert main(["data", "stats", str(run / "data")]) == 0
    out, err = capsys.readouterr()
    assert [row[:4] for row in _table_rows(out)] == [
        ["cafe", "1", "1", "1"],
        ["shop", "2", "3", "4"],
        ["all", "2", "4", "5"],
    ]
    assert err == ""


def test_critiques_build_writes_both_and_stats_reads_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``critiques build`` writes critiques and narratives per split and stamps its directory as
    ``moe-rec run`` would; ``critiques stats --json`` prints its stats.json."""
    from moe_rec import stages
    from moe_rec.config import load_config

    run = tmp_path / "run"
    args = [f"run_dir={run}", "data.synthetic.num_users=120", "data.synthetic.items_per_service=200",
            "critiques.min_matching_items=5"]  # fmt: skip
    assert main(["data", "prepare", *args]) == 0
    assert main(["critiques", "build", *args]) == 0
    for sub in ("critiques", "narratives"):
        assert {p.name for p in (run / sub).iterdir()} >= {
            "train.parquet",
            "valid.parquet",
            "test.parquet",
            "stats.json",
        }
    cfg = load_config(ExperimentConfig, overrides=args)
    assert stages.read(run / "critiques") == stages.critiques_print(cfg)
    capsys.readouterr()
    assert main(["critiques", "stats", str(run / "critiques"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == json.loads((run / "critiques" / "stats.json").read_text()) and stats["rows"]["train"] > 0
    assert main(["critiques", "stats", str(run / "critiques")]) == 0
    out = capsys.readouterr().out
    assert "BM25" in out and "considered" in out


class _Stop(Exception):
    """Raised by a stand-in stage to end ``moe-rec run`` early."""


@pytest.mark.parametrize("enabled", [False, True])
def test_run_builds_critiques_only_when_enabled(
    enabled: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``moe-rec run`` builds critiques after the data, before the semantic IDs, only with
    ``critiques.enabled``; here the SID stage stops the run."""
    import moe_rec.cli as cli

    def stop(*args: object, **kwargs: object) -> None:
        raise _Stop

    monkeypatch.setattr(cli, "stage_sids", stop)
    run = tmp_path / "run"
    args = [f"run_dir={run}", "data.synthetic.num_users=60", "data.synthetic.items_per_service=100",
            f"critiques.enabled={str(enabled).lower()}"]  # fmt: skip
    with pytest.raises(_Stop):
        main(["run", *args])
    assert (run / "critiques" / "stats.json").exists() == enabled
    assert (run / "narratives" / "stats.json").exists() == enabled


def test_help_shows_no_rest_markup(capsys: pytest.CaptureFixture) -> None:
    from moe_rec.train.__main__ import main as train_main

    commands = [[], ["run"], ["data"], ["data", "prepare"], ["data", "stats"], ["sids", "build"],
                ["sequences", "build"], ["train"], ["eval"], ["export"], ["recommend"], ["serve"],
                ["critiques"], ["critiques", "build"], ["critiques", "stats"]]  # fmt: skip
    for command in commands:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert "usage: moe-rec" in out
        assert not re.search(r"``|:(class|func|mod|meth):`", out), (command, out)
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert "python -m moe_rec.train --config CONFIG" in out and "``" not in out


def test_a_bug_shows_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the project's own errors (bad input) become one line; anything else is a bug."""
    from moe_rec.data import store

    def broken(data_dir: Path) -> dict:
        raise KeyError("services")

    monkeypatch.setattr(store, "read_stats", broken)
    with pytest.raises(KeyError, match="services"):
        main(["data", "stats", str(tmp_path)])


def test_a_model_override_the_model_refuses_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_sequences(tmp_path / "run")
    argv = [
        "train",
        "--config",
        str(DEMO),
        f"run_dir={tmp_path / 'run'}",
        "model.overrides.num_experts_per_tok=9",
        *PLAIN_ITEM_MODEL,
    ]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: model: num_experts_per_tok=9 must be in [1, 4]" in err and "Traceback" not in err


# --- an item-level run: two training starts, then `moe-rec eval` in its own process ---------------

ITEM_RUN = ["model.kind=item", "train.wandb.mode=offline", "train.lr=0.0003", "train.min_lr=0.00003",
            "train.eval_every=2", "train.max_eval_samples=0", *PLAIN_ITEM_MODEL]  # fmt: skip


@pytest.fixture(scope="module")
def item_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Train, valid and test sequences, and an item-level model trained through DeepSpeed with W&B
    offline in two starts (stopped at step 4, resumed to 8); returns the run directory and the two
    training summaries."""
    from moe_rec.train import train

    run = tmp_path_factory.mktemp("item") / "run"
    write_sequences(run, test=True)
    first = train(tiny_config(run, *ITEM_RUN, "train.stop_at=4"))
    rest = train(tiny_config(run, *ITEM_RUN))
    return run, [first, rest]


@pytest.fixture(scope="module")
def evaluated(item_run: tuple[Path, list[dict]], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``moe-rec eval --checkpoint best --json --save-predictions PATH`` on the test split, in a fresh
    process (DeepSpeed and wandb imported there as a user's shell would); its output and the path."""
    run, _ = item_run
    predictions = tmp_path_factory.mktemp("eval") / "predictions.jsonl"
    cmd = [sys.executable, "-m", "moe_rec.cli", "eval", "--config", str(DEMO), f"run_dir={run}", *ITEM_RUN,
           "--checkpoint", "best", "--json", "--save-predictions", str(predictions)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done, predictions


@pytest.mark.slow  # trains an item-level model twice (fixture, ~20 s)
def test_a_resumed_run_continues_its_wandb_run_and_says_how_to_upload_all_of_it(
    item_run: tuple[Path, list[dict]],
) -> None:
    """Offline, W&B writes each start of a run as one more part (a directory named with the run's id);
    the summary names them and its `wandb sync` command takes every part (it used to name the last
    part's files/ folder, which `wandb sync` finds nothing in)."""
    run, (first, rest) = item_run
    run_id = (run / "wandb_id").read_text().strip()
    parts = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))[:2]  # the training starts
    assert f"offline run {run_id}" in first["wandb"] and "(1 part:" in first["wandb"]
    assert f"offline run {run_id}" in rest["wandb"] and "(2 parts:" in rest["wandb"]
    for part in parts:  # the same W&B run in each: its id, resumable
        (run_record,) = [r.run for r in wandb_records(part / f"run-{run_id}.wandb") if r.HasField("run")]
        assert (run_record.run_id, run_record.resume) == (run_id, True)
    command = re.search(r"`wandb (sync [^`]+)`", rest["wandb"]).group(1)
    cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run(
        f"{cli} {command} --dry-run", shell=True, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert all(part.name in done.stdout + done.stderr for part in parts), done.stdout + done.stderr


@pytest.mark.slow  # trains an item-level model twice (fixture, ~20 s)
def test_eval_json_is_all_of_stdout_and_matches_an_in_process_evaluation(
    item_run: tuple[Path, list[dict]], evaluated: tuple
) -> None:
    from moe_rec.eval.evaluate import evaluate_model
    from moe_rec.train.checkpoint import load_model
    from moe_rec.train.data import load_split

    run, _ = item_run
    done, _ = evaluated
    report = json.loads(done.stdout)
    best = (run / "checkpoints" / "best").read_text().strip()
    assert report == json.loads((run / "eval" / f"test-{best}.json").read_text())
    cfg = tiny_config(run, *ITEM_RUN)
    model, table = load_model(run / "checkpoints", "best"), SIDTable.load(run / "sids")
    want = evaluate_model(model, table, load_split(run / "sequences", "test"), cfg.eval)
    assert report["model"] == best and report["metrics"] == pytest.approx(want)
    for noise in ("Processing zero checkpoint", "Loading checkpoint shards", "Setting accelerator"):
        assert noise not in done.stdout + done.stderr


@pytest.mark.slow  # trains an item-level model twice (fixture, ~20 s)
def test_saved_predictions_recompute_the_reported_metrics(evaluated: tuple) -> None:
    done, predictions = evaluated
    metrics = json.loads(done.stdout)["metrics"]
    for k in (5, 10):
        recall, ndcg, lines = from_predictions(predictions, k)
        assert (recall, ndcg) == pytest.approx((metrics[f"test/recall@{k}"], metrics[f"test/ndcg@{k}"]))
    assert sorted(line["request"] for line in lines) == list(range(int(metrics["test/count"])))
    assert 0 < metrics["test/ndcg@10"] < 1  # the model misses some: the check has positions to count


@pytest.mark.slow  # trains an item-level model twice (fixture, ~20 s)
def test_test_metrics_go_to_metrics_jsonl_and_the_runs_wandb_run(
    item_run: tuple[Path, list[dict]], evaluated: tuple
) -> None:
    run, _ = item_run
    done, _ = evaluated
    metrics = json.loads(done.stdout)["metrics"]
    best = (run / "checkpoints" / "best").read_text().strip()
    rows = [json.loads(line) for line in (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert {row["kind"] for row in rows} == {"train", "valid", "router", "test"}  # every row has one
    assert all(("train/loss" in row) == (row["kind"] == "train") for row in rows)
    assert all(any(k.startswith("valid/") for k in row) == (row["kind"] == "valid") for row in rows)
    (test,) = [row for row in rows if row["kind"] == "test"]
    assert (test["checkpoint"], test["step"]) == (best, int(best.removeprefix("step_")))
    assert {k: test[k] for k in metrics} == metrics
    run_id = (run / "wandb_id").read_text().strip()
    assert {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}  # no new run
    summaries = {}
    for part in sorted((run / "wandb").glob(f"offline-run-*-{run_id}")):
        for record in wandb_records(part / f"run-{run_id}.wandb"):
            if record.HasField("summary"):
                summaries.update({u.key: json.loads(u.value_json) for u in record.summary.update if u.key})
    assert {k: summaries[k] for k in metrics} == pytest.approx(metrics)


@pytest.mark.slow  # trains an item-level model twice (fixture, ~20 s)
def test_eval_prints_its_table_on_stdout(
    item_run: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(item_run[0], run)  # this evaluation adds to metrics.jsonl and W&B too
    capsys.readouterr()
    assert main(["eval", "--config", str(DEMO), f"run_dir={run}", *ITEM_RUN, "--checkpoint", "latest"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(
        (run / "eval" / f"test-{(run / 'checkpoints' / 'latest').read_text().strip()}.json").read_text()
    )
    rows = {row[0]: row for row in _table_rows(out)}
    assert set(rows) == {"grocery", "market", "all", "macro"}
    assert rows["all"][1] == f"{int(report['metrics']['test/count']):,}"
    assert rows["all"][5] == f"{report['metrics']['test/ndcg@10']:.4f}"  # columns: R@5 N@5 R@10 N@10
    assert _table_rows(err) == [] and "wrote" in err and "wrote" not in out


def _text_neighbour_ndcg10(run_dir: Path, cold: set[tuple[str, str]]) -> tuple[float, float]:
    """Test NDCG@10 of 'the last item's nearest text neighbours' on cold and on warm targets, with
    plain loops over the events (the last item itself left out, ties by item id)."""
    import math

    import torch.nn.functional as F

    from moe_rec.config import load_config
    from moe_rec.data import store
    from moe_rec.sid.build import item_embeddings

    cfg = load_config(ExperimentConfig, None, [f"run_dir={run_dir}", *TINY])
    items = store.load_table(run_dir / "data", store.ITEMS_DIR)
    vectors = F.normalize(item_embeddings(items, cfg.sid, cfg.embedding_cache)[0].double(), dim=-1)
    keys = list(zip(items.column("service").to_pylist(), items.column("item_id").to_pylist()))
    vec = dict(zip(keys, vectors))
    events = store.load_table(run_dir / "data").to_pylist()
    gains: dict[str, list[float]] = {"cold": [], "warm": []}
    for target in (e for e in events if e.get("split") == "test"):
        user, service = target["user"], target["service"]
        earlier = sorted(
            (e["position"], e["item_id"]) for e in events
            if e["user"] == user and e["service"] == service and e["position"] < target["position"]
        )  # fmt: skip
        gain = 0.0
        if earlier:
            last = earlier[-1][1]
            candidates = sorted(i for s, i in keys if s == service and i != last)
            score = {i: float(vec[service, i] @ vec[service, last]) for i in candidates}
            ranking = sorted(candidates, key=lambda i: -score[i])  # stable: ties stay by id
            if target["item_id"] in ranking[:10]:
                gain = 1 / math.log2(ranking.index(target["item_id"]) + 2)
        gains["cold" if (service, target["item_id"]) in cold else "warm"].append(gain)
    return sum(gains["cold"]) / len(gains["cold"]), sum(gains["warm"]) / len(gains["warm"])


def test_cold_start_benchmark_through_the_cli(run_dir: Path, tmp_path: Path) -> None:
    """sequences.cold_items keeps a share of items out of training; the item-level model, popularity
    and the text-neighbour baseline report cold and warm targets; popularity never finds a cold one."""
    import shutil

    from moe_rec.data.cold_start import read_cold_items

    copy, args = _copy_run(run_dir, tmp_path)
    for old in ("checkpoints", "eval"):  # the copied run's token-level model and its reports
        shutil.rmtree(copy / old)
    args += ["sequences.cold_items=0.3", "model.kind=item", "model.overrides.item_loss=items",
             "model.overrides.item_embedding=true"]  # fmt: skip
    assert main(["sequences", "build", *args]) == 0
    cold = read_cold_items(copy / "sequences")
    assert 0.2 < len(cold) / len(SIDTable.load(copy / "sids")) < 0.4
    train = datasets.Dataset.from_parquet(str(copy / "sequences" / "train" / "*.parquet"))
    table = SIDTable.load(copy / "sids")
    vocab = table.vocabulary()
    cold_tokens = {tuple(vocab.item_tokens(s, table.codes_for(s, [i])[0].tolist())) for s, i in cold}
    size = 2 + vocab.levels
    for row in train.select(range(min(50, len(train)))):
        events = {tuple(row["input_ids"][j : j + size]) for j in range(1, len(row["input_ids"]), size)}
        assert not events & cold_tokens
    reports = {}
    assert main(["train", *args]) == 0
    for baseline in (None, "popularity", "text"):
        assert main(["eval", *args, *(["--baseline", baseline] if baseline else [])]) == 0
        name = baseline or "model"
        (path,) = (copy / "eval").glob(f"test-{baseline or 'step_*'}.json")
        reports[name] = json.loads(path.read_text())["metrics"]
        m = reports[name]
        assert m["test/cold/count"] + m["test/warm/count"] == m["test/count"]
        assert m["test/cold/count"] > 0
    assert reports["popularity"]["test/cold/recall@20"] == 0.0  # no training count, never recommended
    cold_ndcg, warm_ndcg = _text_neighbour_ndcg10(copy, cold)
    assert reports["text"]["test/cold/ndcg@10"] == pytest.approx(cold_ndcg, abs=1e-9)
    assert reports["text"]["test/warm/ndcg@10"] == pytest.approx(warm_ndcg, abs=1e-9)


def test_overrides_may_follow_a_commands_options() -> None:
    """KEY=VALUE after the options joins the overrides in order; an unknown option is refused."""
    args = parse(["eval", "--config", "c.yaml", "a.b=1", "--checkpoint", "best", "--critiques", "c.d=x=y"])
    assert args.overrides == ["a.b=1", "c.d=x=y"] and args.checkpoint == "best" and args.critiques
    assert parse(["eval", "a.b=1"]).overrides == ["a.b=1"]
    with pytest.raises(SystemExit):
        parse(["eval", "--checkpoint", "best", "--nope=1"])
