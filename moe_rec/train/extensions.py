"""DeepSpeed's CPU shared-memory op, which it JIT-builds into the torch extensions cache.

On a CPU machine ``deepspeed.init_distributed`` builds the ``deepspeed_shm_comm`` op (C++, about
a minute) into ``TORCH_EXTENSIONS_DIR/deepspeed_shm_comm`` the first time, and loads it after
that. torch's builder holds a ``lock`` file open in that directory while it builds; a process
that finds the file waits, polling, until it is gone. A build killed half way leaves the file
behind, and every later run then waits forever without a word. So before DeepSpeed builds:

* :func:`check_build_locks` looks at each ``<extensions>/<op>/lock``: one that no process on
  this machine holds open is stale and is removed (by local rank 0, saying so; the other ranks
  wait for that), and one a live build holds is reported, so a wait is never silent;
* :func:`skip_shm_op` tells DeepSpeed not to build the op at all where there is one process:
  the op only speeds up collectives between ranks of one machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from moe_rec.console import console

LOCK_FILE = "lock"  # torch.utils.cpp_extension's FileBaton in every extension's build directory


def lock_holders(lock: Path) -> list[int] | None:
    """Ids of this machine's processes that hold ``lock`` open; ``None`` where ``/proc`` cannot
    tell (not Linux). Processes of other users whose descriptors cannot be read are left out."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    holders = []
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # the process ended, or is not ours to look at
            continue
    return holders


def check_build_locks(root: Path, local_rank: int) -> None:
    """Deal with every extension build lock under ``root`` before DeepSpeed may wait on one.

    Args:
        root: ``TORCH_EXTENSIONS_DIR``.
        local_rank: this process's rank on this machine; rank 0 removes stale locks, the others
            wait until it has (so none of them mistakes the removal for a finished build).
    """
    for lock in sorted(Path(root).glob(f"*/{LOCK_FILE}")):
        op = lock.parent.name
        holders = lock_holders(lock)
        if holders is None:
            console.print(
                f"[yellow]{lock} exists: DeepSpeed waits until it is gone. If no other run is building "
                f"{op} now, an interrupted build left it: delete it."
            )
        elif holders:
            console.print(
                f"waiting for process {', '.join(map(str, holders))} to finish building {op} ({lock})"
            )
        elif local_rank == 0:
            lock.unlink(missing_ok=True)
            console.print(
                f"[yellow]removed {lock}: an interrupted build of {op} left it (no process holds it); "
                "building again"
            )
        else:
            console.print(f"{lock} is stale; waiting for local rank 0 to remove it")
            while lock.exists() and lock_holders(lock) == []:
                time.sleep(0.1)


def skip_shm_op() -> None:
    """Mark DeepSpeed's shared-memory op unavailable, so ``deepspeed.init_distributed`` neither
    builds nor loads it and one process starts without a JIT build; collectives then go through
    plain ``torch.distributed``. DeepSpeed's comm backend builds the op only when
    ``deepspeed.ops.__compatible_ops__`` lists it as compatible (``build_shm_op`` in
    ``deepspeed/comm/torch.py``); that dict is computed once and kept, so this entry holds. No
    environment variable or config key turns the build off."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
