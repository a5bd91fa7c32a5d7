"""Time optimizer steps of an experiment's training, as the trainer runs them (collation, forward,
backward, AdamW under DeepSpeed), on the run's prepared sequences: the median seconds a step and
the last step's loss, so two versions of the code can be compared on the same data (run it at
each, interleaved, on the same machine: docs/model.md, the item loss).

    OMP_NUM_THREADS=1 python tools/bench_train_step.py --config configs/experiments/amazon2014_joint.yaml \\
        run_dir=runs/joint-prof --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import time

from moe_rec.config import load_config
from moe_rec.experiment import ExperimentConfig
from moe_rec.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="experiment YAML; its run_dir holds data, sids, sequences"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = ["train.wandb.mode=disabled", "train.eval_every=0", *args.overrides]
    trainer = Trainer(load_config(ExperimentConfig, args.config, overrides))  # starts from step 0: no resume
    stream = trainer.data(trainer.position)
    for _ in range(args.warmup):
        trainer.train_step(stream)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stats = trainer.train_step(stream)
        times.append(time.perf_counter() - t0)
    print(f"s a step: {' '.join(f'{t:.2f}' for t in times)}; median {statistics.median(times):.2f}; "
          f"last loss {stats.loss:.7f}")  # fmt: skip


if __name__ == "__main__":
    main()
