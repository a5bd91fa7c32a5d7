"""DeepSpeed's CPU shared-memory op: one process starts without building it, and a build lock
left by an interrupted build is removed with a message instead of making every run wait."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_rec.train.extensions import check_build_locks

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh process imports DeepSpeed and joins a process group: ~12 s
def test_one_cpu_process_builds_no_shm_op(tmp_path: Path) -> None:
    dist = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_EXTENSIONS_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env.update(MOE_REC_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    script = (
        "import torch.distributed as dist\n"
        "from moe_rec.train.trainer import init_distributed\n"
        "print('ranks', init_distributed()[:2])\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ranks (0, 1)" in done.stdout
    assert not (tmp_path / "cache" / "torch_extensions" / "deepspeed_shm_comm").exists()


def test_a_lock_no_process_holds_is_removed_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # as a build killed while compiling leaves it
    check_build_locks(tmp_path, local_rank=0)
    assert not lock.exists()
    said = "".join(capsys.readouterr().err.split())
    assert f"removed{lock}".replace(" ", "") in said and "interrupted" in said


def test_a_lock_a_live_build_holds_is_kept_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it during a build
    try:
        for local_rank in (0, 1):
            check_build_locks(tmp_path, local_rank=local_rank)
            assert lock.exists()
            said = " ".join(capsys.readouterr().err.split())
            assert f"waiting for process {os.getpid()}" in said and "deepspeed_shm_comm" in said
    finally:
        os.close(fd)
