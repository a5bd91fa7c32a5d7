"""The training stage: DeepSpeed (ZeRO 1/2/3) training of ``MoERecForCausalLM`` on the sequences
of a run directory, with checkpoints, exact resume, validation and rank-0 W&B logging.

Importing this package is cheap (DeepSpeed loads only when :func:`train` runs). Launch commands
are in :mod:`moe_rec.train.__main__` and ``launch/README.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # moe_rec.experiment imports moe_rec.train.config, so not at run time
    from moe_rec.experiment import ExperimentConfig


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train ``cfg`` on this process's rank; returns a summary (steps, losses, validation metrics,
    where the checkpoint and the W&B run went)."""
    from moe_rec.train.trainer import train as run

    return run(cfg)
