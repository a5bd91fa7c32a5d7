"""tools/run_benchmark.py end to end on tiny synthetic data: the dense twin x two seeds, run as two
commands (one seed each), each trained in its own process with W&B offline, evaluated on test; the
second command's summary covers both, its mean ± std equal the per-run reports; a rerun resumes
without retraining; --summary-only rewrites the same table. (MoE variants train the same way
through the same command; tests/test_cli.py trains one.)"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _bench(root: Path, cache: Path, *seeds: str) -> subprocess.CompletedProcess:
    overrides = [o for o in TINY if not o.startswith("train.wandb")]
    cmd = [
        sys.executable, str(ROOT / "tools" / "run_benchmark.py"), *overrides, "train.wandb.mode=offline",
        f"sid.encoder.cache_dir={cache}", "--config", "configs/experiments/demo.yaml", "--root", str(root),
        "--variants", "dense", "--seeds", *seeds,
    ]  # fmt: skip
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_matrix_trains_every_variant_and_summarises_the_seeds(tmp_path: Path) -> None:
    for seed in ("0", "1"):  # two commands: the second summary covers the first one's run too
        done = _bench(tmp_path / "bench", tmp_path / "cache", seed)
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
            cell = summary["joint"][variant]["overall"][key]
            assert cell["values"] == values and cell["seeds"] == [0, 1]
            assert cell["mean"] == pytest.approx(sum(values) / 2)
            assert cell["std"] == pytest.approx(statistics.stdev(values), nan_ok=True)
    table = (tmp_path / "bench" / "summary.md").read_text()
    assert "| joint | dense | overall | 0 1 |" in table

    log = runs[0] / "logs" / "train.log"
    assert log.read_text().count("==> ") == 1  # one command, its header line, then its output
    again = _bench(tmp_path / "bench", tmp_path / "cache", "0", "1")  # everything on disk: nothing reruns
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout

    (tmp_path / "bench" / "summary.md").unlink()
    only = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "run_benchmark.py"), "--root", str(tmp_path / "bench"), "--summary-only"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert only.returncode == 0, only.stderr[-3000:]
    assert (tmp_path / "bench" / "summary.md").read_text() == table
