"""Teacher targets for a joint run: one model per service ranks its catalogue at every scored
position of the joint train split (moe_rec.train.distill); train the joint model on them with
``train.teacher_targets=FILE`` (and ``model.overrides.distill_weight``).

    python tools/teacher_targets.py --config configs/experiments/amazon2014_joint.yaml run_dir=runs/joint \\
        --teacher beauty=runs/beauty --teacher sports=runs/sports --teacher toys=runs/toys \\
        --top-k 32 --out runs/joint/teachers.pt

A teacher is a run directory of one service (its ``checkpoints/`` and ``sids/``), trained on the
same events; its ``best`` checkpoint is read unless ``service=RUN_DIR@TAG`` names another. Name a
service more than once (e.g. its runs of two seeds) and its teachers are an ensemble: their
probabilities over the service's items are averaged before the top K.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_rec.config import ConfigError, load_config
from moe_rec.data.schema import DataError
from moe_rec.experiment import ExperimentConfig
from moe_rec.model import MoERecForItemPrediction
from moe_rec.sid.table import SIDTable
from moe_rec.train.checkpoint import CheckpointError, load_model
from moe_rec.train.data import load_split
from moe_rec.train.distill import Teacher, teacher_targets


def load_teacher(spec: str) -> tuple[str, Teacher]:
    """``service=RUN_DIR[@TAG]`` -> (service, its teacher); SystemExit with the reason otherwise."""
    service, sep, where = spec.partition("=")
    if not sep or not service or not where:
        raise SystemExit(f"error: --teacher {spec!r}: expected service=RUN_DIR (e.g. beauty=runs/beauty)")
    run_dir, _, tag = where.partition("@")
    run = Path(run_dir)
    try:
        model = load_model(run / "checkpoints", tag or "best")
        table = SIDTable.load(run / "sids")
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: --teacher {spec!r}: {e}") from None
    if not isinstance(model, MoERecForItemPrediction):
        raise SystemExit(f"error: --teacher {spec!r} holds a token-level model; teachers rank items exactly")
    if service not in table.services:
        raise SystemExit(
            f"error: --teacher {spec!r}: its SID table has services {table.services}, not {service!r}"
        )
    return service, Teacher(model.eval(), table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the joint run's experiment YAML")
    parser.add_argument("--teacher", action="append", required=True, metavar="SERVICE=RUN_DIR[@TAG]",
                        help="one service's teacher run (repeat per service; a service named twice: an ensemble)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=32, help="items kept per position (default 32)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="each teacher's logits divided by this before its softmax (> 1: softer; default 1)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64, help="train samples per teacher batch")
    parser.add_argument(
        "--out", type=Path, required=True, help="the file to write (e.g. RUN_DIR/teachers.pt)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, not {args.top_k}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, not {args.temperature}")
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
        teachers: dict[str, list[Teacher]] = {}
        for spec in args.teacher:
            service, teacher = load_teacher(spec)
            teachers.setdefault(service, []).append(teacher)
        table = SIDTable.load(cfg.sid_dir)
        samples = load_split(cfg.sequences_dir, "train")
        with torch.no_grad():
            targets = teacher_targets(
                samples, table, teachers, args.top_k, batch_size=args.batch_size, temperature=args.temperature
            )
    except (ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    targets.meta["teachers"] = {s: [t for t in args.teacher if t.partition("=")[0] == s] for s in teachers}
    targets.save(args.out)
    covered = int((targets.rows[:, 0] >= 0).sum())
    print(f"{args.out}: {len(targets)} train samples, {targets.meta['events']} scored events "
          f"({covered} with a teacher's top {args.top_k})", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
