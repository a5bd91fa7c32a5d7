"""tools/gpu_check.sh on a machine without a GPU. Slow: the whole dry pass (every step at tiny sizes
on the CPU) exits 0, prints one table with a row per step and writes it under $OUT. Fast: without
--dry-run and without CUDA it turns into the dry pass by itself, and a spent budget or --skip
skips steps instead of running them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("setup", "megablocks", "pytest_gpu", "bench_moe", "train_data", "train", "bench_decode",
         "bench_topk", "bench_serve", "launcher")  # fmt: skip


def _check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    cmd = ["bash", "tools/gpu_check.sh", "--work", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(stdout: str) -> dict[str, list[str]]:
    """``step -> [status, seconds, result]`` from the printed table."""
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| ")
    ]
    assert cells[0] == ["step", "status", "seconds", "result"]
    return {row[0]: row[1:] for row in cells[1:]}


@pytest.mark.slow
def test_the_dry_pass_runs_every_step_and_prints_the_table(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the dry pass is for machines without one (run --dry-run by hand)")
    done = _check(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.startswith("# gpu_check: dry pass")
    rows = _rows(done.stdout)
    assert tuple(rows) == STEPS
    assert all(rows[s][0] == "PASS" for s in STEPS if s != "megablocks"), done.stdout
    assert rows["megablocks"][0] in ("PASS", "SKIP")
    assert "tokens/s" in rows["train"][2] and "TFLOP/s" in rows["train"][2]
    assert "moe grouped_mm" in rows["bench_moe"][2] and "collected" in rows["pytest_gpu"][2]
    out = tmp_path / "out"
    assert (out / "gpu_check_summary.md").read_text().startswith(done.stdout.rstrip("\n"))
    assert "===== train" in (out / "gpu_check_logs.txt").read_text()
    assert '"perf/tokens_per_s"' in (out / "train_metrics.jsonl").read_text()


def test_without_cuda_it_is_a_dry_pass_and_a_spent_budget_skips_steps(tmp_path: Path) -> None:
    """``--skip`` names steps left out (an unknown name is refused); the spent budget skips the rest."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = _check(tmp_path, "--budget", "0", "--skip", "megablocks,bench_moe,bench_topk")
    assert "no CUDA device" in done.stderr and done.stdout.startswith("# gpu_check: dry pass")
    rows = _rows(done.stdout)
    assert tuple(rows) == STEPS
    assert {status for status, _, _ in rows.values()} == {"SKIP"}
    assert rows["setup"][2] == "no time left in the 0s budget"
    assert [s for s in STEPS if rows[s][2] == "left out (--skip)"] == [
        "megablocks",
        "bench_moe",
        "bench_topk",
    ]
    assert done.returncode == 0  # a skipped step is no failure
    typo = _check(tmp_path, "--skip", "bench_top")
    assert typo.returncode == 2 and "--skip bench_top: no such step" in typo.stderr
