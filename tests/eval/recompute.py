"""Recall@K and NDCG@K recomputed from a ``--save-predictions`` file with a plain loop, the way
someone without moe_rec would (shared by the evaluation and CLI tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def from_predictions(path: Path, k: int) -> tuple[float, float, list[dict]]:
    """(Recall@k, NDCG@k, the lines) of the JSONL file at ``path``."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    hits, gains = 0.0, 0.0
    for line in lines:
        top = line["ranked"][:k]
        if line["target"] in top:
            position = top.index(line["target"])
            hits += 1.0
            gains += 1.0 / math.log2(position + 2)
    return hits / len(lines), gains / len(lines), lines
