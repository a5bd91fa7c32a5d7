"""``python -m moe_rec.train --config CONFIG [key=value ...]``: train one experiment.

Every rank runs this module; the launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT (started without them it is a one-rank run). The run directory must already hold
sequences (``moe-rec run --config CONFIG``). Exact commands (see ``launch/README.md``)::

    # one process, CPU or one GPU
    python -m moe_rec.train --config configs/experiments/demo.yaml
    # 2 processes on CPU (gloo, DS_ACCELERATOR=cpu)
    launch/cpu.sh 2 configs/experiments/demo.yaml train.deepspeed=configs/deepspeed/zero3.json
    # 8 GPUs of one node / every node of a hostfile / SLURM
    launch/single_node.sh 8 configs/experiments/demo.yaml model.size=small
    launch/multi_node.sh launch/hostfile.example configs/experiments/demo.yaml
    sbatch launch/slurm.sbatch configs/experiments/demo.yaml

A run with ``train.resume=auto`` (default) continues from ``<run_dir>/checkpoints/latest``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from moe_rec import cli
from moe_rec.console import plain


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the launcher's arguments, then run ``moe-rec train`` (same errors: one line, exit 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_rec.train", description=plain(__doc__.splitlines()[0])
    )
    parser.add_argument("--config", required=True, help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    return cli.main([*(["--debug"] if args.debug else []), "train", "--config", args.config, *args.overrides])


def _leave(code: int) -> None:
    """Exit a training process without interpreter teardown: with several gloo ranks a
    communication thread can abort the process on its way out ("terminate called without an
    active exception") after a run that succeeded, and the launcher would report a failure."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
