"""What the routers learned: each service's expert load per MoE layer, from a run's metrics.jsonl.

Training writes a ``router`` row at every validation (``router/expert_load``: layer x service x
expert shares of routed tokens, each service's row summing to 1). This prints the row at the best
checkpoint's step (or ``--step``) as one table per layer, and how far each service's load is from
the all-service mean (total variation distance: 0 = the same experts as everyone, 1 = experts of
its own), the number to compare between routers and runs.

    python tools/expert_load.py runs/joint-item
    python tools/expert_load.py runs/joint-item --step 572 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def router_rows(metrics: Path) -> dict[int, dict]:
    """Every ``router`` row of a metrics.jsonl by step (a resumed run's later row wins)."""
    rows = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "router":
            rows[int(row["step"])] = row
    return rows


def specialisation(load: np.ndarray) -> np.ndarray:
    """(layers, services) total variation distance of each service's load from the services' mean.

    Args:
        load: (layers, services, experts) shares, each service's row summing to 1.
    """
    mean = load.mean(axis=1, keepdims=True)
    return 0.5 * np.abs(load - mean).sum(axis=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="default: the best checkpoint's step, else the last row")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "checkpoints" / "metrics.jsonl"
    if not metrics.exists():
        print(f"error: {metrics} not found (train the run first)", file=sys.stderr)
        return 2
    rows = router_rows(metrics)
    if not rows:
        print(f"error: {metrics} has no router rows (a dense model, or no validation yet)", file=sys.stderr)
        return 2
    step = args.step
    best = args.run_dir / "checkpoints" / "best"
    if step is None and best.exists():
        step = int(best.read_text().strip().removeprefix("step_"))
    if step is None or step not in rows:
        if args.step is not None:
            print(f"error: no router row at step {step}; steps with one: {sorted(rows)}", file=sys.stderr)
            return 2
        step = max(rows)
    row = rows[step]
    load = np.asarray(row["router/expert_load"], dtype=np.float64)  # (layers, services, experts)
    services, spec = row["services"], specialisation(load)
    if args.json:
        print(json.dumps({"step": step, "services": services, "expert_load": load.tolist(),
                          "specialisation": spec.tolist()}))  # fmt: skip
        return 0
    print(f"expert load at step {step} ({args.run_dir}); share of each service's routed tokens")
    for layer, (shares, tv) in enumerate(zip(load, spec, strict=True)):
        print(f"layer {layer}  " + "  ".join(f"e{e:<4}" for e in range(shares.shape[1])) + "  TV from mean")
        for name, share, d in zip(services, shares, tv, strict=True):
            print(f"  {name:<9} " + "  ".join(f"{s:.3f}" for s in share) + f"  {d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
