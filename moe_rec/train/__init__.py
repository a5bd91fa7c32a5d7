"""The training stage: DeepSpeed (ZeRO 1/2/3) training of ``MoERecForCausalLM`` on the sequences
of a run directory, with checkpoints, exact resume, validation and rank-0 W&B logging.

Importing this package is cheap (DeepSpeed loads only when :func:`train` runs). Launch commands
are in :mod:`moe_rec.train.__main__` and ``launch/README.md``.
"""

from __future__ import annotations

from typing import Any

from moe_rec.train.config import TrainInputs


def train(cfg: TrainInputs) -> dict[str, Any]:
    """Train ``cfg`` on this process's rank; returns a summary (steps, losses, validation metrics,
    where the checkpoint and the W&B run went)."""
    from moe_rec.train.trainer import train as run

    return run(cfg)
