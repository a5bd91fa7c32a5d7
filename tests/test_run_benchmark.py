"""tools/run_benchmark.py. Slow: end to end on tiny synthetic data, the dense twin, SASRec and
popularity x two seeds, run as two commands (one seed each), each trained in its own process with
W&B offline, evaluated on test; the second command's summary covers both, its mean ± std equal the
per-run reports; a rerun resumes without retraining; --summary-only rewrites the same table. (MoE
variants train the same way through the same command; tests/test_cli.py trains one.) Fast: the
summary of hand-written reports against a plain loop, bad input to --summary-only, and the step
logs a resumed run appends."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import TINY
from tests.tools import TOOLS, load_tool

ROOT = Path(__file__).resolve().parents[1]
TOOL = TOOLS / "run_benchmark.py"
COLUMNS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]


def _bench(root: Path, cache: Path, *seeds: str, jobs: int = 1) -> subprocess.CompletedProcess:
    overrides = [o for o in TINY if not o.startswith("train.wandb")]
    cmd = [
        sys.executable, str(TOOL), *overrides, "train.wandb.mode=offline",
        f"sid.encoder.cache_dir={cache}", "sasrec.epochs=2", "sasrec.eval_every=1", "sasrec.hidden=16",
        "--config", "configs/experiments/demo.yaml", "--root", str(root),
        "--variants", "dense", "sasrec", "popularity", "--seeds", *seeds, "--jobs", str(jobs),
    ]  # fmt: skip
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_matrix_trains_every_variant_and_summarises_the_seeds(tmp_path: Path) -> None:
    for seed, jobs in (
        ("0", 3),
        ("1", 1),
    ):  # two commands: the second summary covers the first one's runs too
        done = _bench(tmp_path / "bench", tmp_path / "cache", seed, jobs=jobs)  # the first: 3 runs at once
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    for variant in ("dense",):
        runs = [tmp_path / "bench" / "joint" / f"{variant}-seed{s}" for s in (0, 1)]
        reports = [json.loads((r / "eval" / "test-best.json").read_text()) for r in runs]
        best = [(r / "checkpoints" / "best").read_text().strip() for r in runs]
        assert [rep["model"] for rep in reports] == best  # the checkpoint chosen on validation
        config = json.loads((runs[0] / "checkpoints" / best[0] / "config.json").read_text())
        assert config["ffn_types"] == ["dense"] * config["num_hidden_layers"]
        assert list((runs[0] / "wandb").glob("offline-run-*")), "no offline W&B run"
        for key in ("recall@10", "ndcg@10"):
            values = [rep["metrics"][f"test/{key}"] for rep in reports]
            assert summary["joint"][variant]["seeds"] == [0, 1]
            cell = summary["joint"][variant]["services"]["overall"][key]
            assert cell["values"] == values
            assert cell["mean"] == pytest.approx(sum(values) / 2)
            assert cell["std"] == pytest.approx(statistics.stdev(values), nan_ok=True)
    for baseline in ("sasrec", "popularity"):  # evaluated by `moe-rec eval --baseline`, beside the model
        reports = [json.loads((tmp_path / "bench" / "joint" / f"{baseline}-seed{s}" / "eval" / "test-best.json")
                              .read_text()) for s in (0, 1)]  # fmt: skip
        assert [rep["model"] for rep in reports] == [baseline] * 2
        cell = summary["joint"][baseline]["services"]["overall"]["ndcg@10"]
        assert cell["values"] == [rep["metrics"]["test/ndcg@10"] for rep in reports]
    sasrec = tmp_path / "bench" / "joint" / "sasrec-seed1" / "logs" / "eval.log"
    assert "sasrec.seed=1" in sasrec.read_text()  # the run's seed reaches the baseline
    table = (tmp_path / "bench" / "summary.md").read_text()
    assert "| joint | dense | overall | 0 1 |" in table
    assert (
        table.index("| joint | dense |")
        < table.index("| joint | sasrec |")
        < table.index("| joint | popularity |")
    )

    log = runs[0] / "logs" / "train.log"
    assert log.read_text().count("==> ") == 1  # one command, its header line, then its output
    again = _bench(tmp_path / "bench", tmp_path / "cache", "0", "1")  # everything on disk: nothing reruns
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout

    (tmp_path / "bench" / "summary.md").unlink()
    only = subprocess.run(
        [sys.executable, str(TOOL), "--root", str(tmp_path / "bench"), "--summary-only"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert only.returncode == 0, only.stderr[-3000:]
    assert (tmp_path / "bench" / "summary.md").read_text() == table


def _summary_only(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), "--root", str(root), "--summary-only", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _report(root: Path, scope: str, run: str, metrics: dict[str, float]) -> None:
    path = root / scope / run / "eval" / "test-best.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": "step_00000100", "config": {}, "metrics": metrics}))


def test_summary_of_hand_written_reports_matches_a_plain_loop(tmp_path: Path) -> None:
    rng = random.Random()
    services = {"joint": ["a", "b"], "a": ["a"]}
    runs = {("joint", "token"): [2, 0, 1], ("joint", "dense"): [0], ("a", "domain_user"): [0, 5]}
    written: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for (scope, variant), seeds in runs.items():
        for seed in seeds:
            metrics = {"test/count": 7.0, "test/macro/ndcg@10": rng.random()}
            for col in COLUMNS:
                metrics[f"test/{col}"] = rng.random()
                for service in services[scope]:
                    metrics[f"test/{service}/{col}"] = rng.random()
            _report(tmp_path, scope, f"{variant}-seed{seed}", metrics)
            written.setdefault((scope, variant), {})[seed] = metrics
    _report(tmp_path, "joint", "wide-seed0", {"test/ndcg@10": 1.0})  # not a variant: ignored
    (tmp_path / "joint" / "token-seed3" / "eval").mkdir(parents=True)  # still training: ignored

    done = _summary_only(tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [line.split(" | ")[:4] for line in (tmp_path / "summary.md").read_text().splitlines()[2:]]
    expected_rows = []
    for scope, variant in [("joint", "dense"), ("joint", "token"), ("a", "domain_user")]:  # joint first
        seeds = sorted(runs[scope, variant])
        entry = summary[scope][variant]
        assert entry["seeds"] == seeds
        for service in [*services[scope], "overall"]:
            expected_rows.append([f"| {scope}", variant, service, " ".join(map(str, seeds))])
            prefix = "test/" if service == "overall" else f"test/{service}/"
            for col in COLUMNS:
                values = [written[scope, variant][s][prefix + col] for s in seeds]
                mean = sum(values) / len(values)
                var = (
                    sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else math.nan
                )
                cell = entry["services"][service][col]
                assert cell["values"] == values
                assert cell["mean"] == pytest.approx(mean, abs=1e-12)
                assert cell["std"] == pytest.approx(math.sqrt(var), abs=1e-12, nan_ok=True)
    assert rows == expected_rows


@pytest.mark.slow  # three runs of the tool, each a fresh process loading the experiment config (torch): ~20 s
def test_summary_only_rejects_bad_input_with_the_reason(tmp_path: Path) -> None:
    empty = _summary_only(tmp_path)
    assert empty.returncode != 0 and "no finished runs" in empty.stderr
    _report(tmp_path, "joint", "dense-seed0", {"test/ndcg@10": 0.1})
    mixed = _summary_only(tmp_path, "--seeds", "1")
    assert mixed.returncode == 2 and "--summary-only" in mixed.stderr and "--seeds" in mixed.stderr
    bad = tmp_path / "joint" / "dense-seed1" / "eval" / "test-best.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"model": "step_1", "metr')
    broken = _summary_only(tmp_path)
    assert broken.returncode != 0 and str(bad) in broken.stderr and "not an eval report" in broken.stderr
    assert not (tmp_path / "summary.md").exists()


def test_a_rerun_step_appends_to_its_log_and_a_failure_names_it(tmp_path: Path) -> None:
    bench = load_tool("run_benchmark")
    log = tmp_path / "logs" / "train.log"
    for word in ("first", "second"):
        bench._run([sys.executable, "-c", f"print('{word} part')"], log)
    text = log.read_text()
    assert text.count("==> ") == 2 and text.index("first part") < text.index("second part")
    with pytest.raises(bench.StepFailed, match="exit 3") as failed:
        bench._run([sys.executable, "-c", "print('third part'); raise SystemExit(3)"], log)
    assert str(log) in str(failed.value) and "third part" in str(failed.value)
    assert "first part" in log.read_text()


def test_a_step_past_the_time_limit_is_stopped_and_none_starts_after_it(tmp_path: Path) -> None:
    bench = load_tool("run_benchmark")
    log, marker = tmp_path / "logs" / "train.log", tmp_path / "finished"
    slow = [
        sys.executable,
        "-c",
        f"import pathlib, time; print('started', flush=True); time.sleep(60); pathlib.Path({str(marker)!r}).touch()",
    ]
    t0 = time.monotonic()
    with pytest.raises(bench.OutOfTime):
        bench._run(slow, log, deadline=t0 + 3)
    assert time.monotonic() - t0 < 30  # stopped at the limit, not after the step's 60 s
    assert not marker.exists()
    text = log.read_text()
    assert "started" in text and text.rstrip().endswith("stopped at the time limit")
    with pytest.raises(bench.OutOfTime):  # past the limit: not even started
        bench._run([sys.executable, "-c", "print('late')"], log, deadline=time.monotonic() - 1)
    assert "late" not in log.read_text()


@pytest.mark.parametrize(
    ("stamped", "expected"),
    [
        ({"data", "sids", "sequences"}, []),
        ({"data", "sids"}, ["sequences build"]),  # a scope brought without its sequences
        ({"data", "sequences"}, ["sids build", "sequences build"]),  # new IDs: new sequences
        (set(), ["data prepare", "sids build", "sequences build"]),
    ],
)
def test_preparation_resumes_at_the_first_unfinished_step(
    tmp_path: Path, stamped: set, expected: list
) -> None:
    bench = load_tool("run_benchmark")
    for out in stamped:
        (tmp_path / out).mkdir()
        (tmp_path / out / bench.STAMP_FILE).write_text("{}")
    (tmp_path / "sids" / "half-written").parent.mkdir(
        exist_ok=True
    )  # a directory without a stamp: unfinished
    ran: list[str] = []
    bench._run = lambda cmd, log, deadline: ran.append(
        " ".join(cmd[cmd.index("--config") - 2 : cmd.index("--config")])
    )
    bench.prepare_scope("configs/experiments/demo.yaml", tmp_path, [])
    assert ran == expected
