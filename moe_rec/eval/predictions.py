"""What an evaluation ranked for each request, written as it goes (``moe-rec eval --save-predictions
PATH``), so that anyone can recompute the metrics from the file alone.

One JSON line per request, in evaluation order (batches of similar requests, not index order)::

    {"request": 17, "user": "u0042", "service": "grocery", "target": "g00031",
     "ranked": ["g00007", "g00031", ...]}

``request`` is the request's index in the split's samples (``sequences/<split>/*.parquet`` read in
file order; the first ``eval.max_samples``), ``target`` its held-out item, ``ranked`` the item ids
the model ranked, best first, each once (as :mod:`moe_rec.eval.metrics` counts them): the largest
K of them, fewer when the service has fewer items left. With ``p`` the target's 0-based position
in ``ranked``, Recall@K is 1 when ``p < K`` and NDCG@K is ``1 / log2(p + 2)`` when ``p < K``
(both 0 when the target is absent); the reported numbers are their means over the requests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from moe_rec.sid.table import SIDTable


class PredictionWriter:
    """Writes the JSON lines above; called with each batch's request indices and ranked table rows.

    Args:
        path: the JSONL file (replaced).
        requests: the evaluated requests (``user``, ``service``, ``target_item``), indexed as the
            evaluation loop's calls index them.
        table: the SID table whose rows the rankings hold.
    """

    def __init__(self, path: Path, requests: Sequence[dict[str, Any]], table: SIDTable) -> None:
        self.path = Path(path)
        self.requests = requests
        self.item_ids = table.item_ids
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")

    def __call__(self, index: Sequence[int], ranked: torch.Tensor) -> None:
        """One line per request: ``index[b]`` and its ranking ``ranked[b]`` (table rows, best first,
        -1 for none)."""
        for i, rows in zip(index, ranked.tolist()):
            r = self.requests[i]
            items = list(dict.fromkeys(str(self.item_ids[j]) for j in rows if j >= 0))
            line = {"request": i, "user": r["user"], "service": r["service"], "target": r["target_item"]}
            self._file.write(json.dumps({**line, "ranked": items}) + "\n")

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()
