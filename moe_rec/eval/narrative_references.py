"""Reference narratives for BLEU / ROUGE-L, and the calibration baselines scored beside the model.

The composed test narratives (``<run_dir>/narratives/test.parquet``) are about the request's
*target*, so the model is asked to narrate the target (teacher-forced: the target's tokens after the
history, then ``[EXPLAIN]``), not its own top item. Only rows in a **held-out family** are
references: their wording was never trained on, so a score measures what the narrative says, not
recall of a template. Three baselines on the same requests calibrate the scale:

* the target's **title** (what a text that names the item, and nothing about the user, scores);
* the **nearest training narrative**: the training narrative whose target is the item of the same
  service most similar to the request's target (cosine of the items' text embeddings, so the
  target's own training narrative when it was a training target; the first in file order among
  equals): what looking the item up in the training narratives scores;
* the **user's last training narrative** in the same service (the nearest by history: its history
  is the test history's prefix; the nearest-item one where the user has none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def held_out_requests(
    requests: Iterable[Mapping[str, Any]], references: Iterable[Mapping[str, Any]], limit: int
) -> list[tuple[Mapping[str, Any], str]]:
    """The first ``limit`` requests (in their order) whose target event has a reference narrative
    in a held-out family, each with that narrative's text; a request and a narrative are the same
    event when ``(user, service, target item)`` agree (one test event per user and service)."""
    texts = {(r["user"], r["service"], r["target_item"]): r["text"] for r in references if r["held_out"]}
    found = []
    for r in requests:
        if len(found) >= limit:
            break
        text = texts.get((r["user"], r["service"], r["target_item"]))
        if text is not None:
            found.append((r, text))
    return found


def nearest_item_narratives(
    targets: Sequence[int],
    train_targets: Sequence[int],
    train_texts: Sequence[str],
    item_vectors: torch.Tensor,
    service_index: torch.Tensor,
) -> list[str | None]:
    """For each target (a table row), the training narrative whose target is the most similar item
    of the same service (None: the service has no training narrative).

    Args:
        targets: the requests' target rows.
        train_targets: each training narrative's target row.
        train_texts: each training narrative's text.
        item_vectors: (N, D) every table row's text embedding.
        service_index: (N,) every table row's service.
    """
    first: dict[int, int] = {}  # a training target row -> its first narrative
    for i, row in enumerate(train_targets):
        first.setdefault(int(row), i)
    keys = torch.tensor(list(first), dtype=torch.long)
    unit = F.normalize(item_vectors.float(), dim=-1)
    out: list[str | None] = []
    for row in targets:
        mine = keys[service_index[keys] == service_index[row]]
        if not len(mine):
            out.append(None)
            continue
        best = int(mine[int((unit[mine] @ unit[row]).argmax())])  # the first of equal maxima
        out.append(train_texts[first[best]])
    return out


def users_last_narratives(
    requests: Sequence[Mapping[str, Any]], train: Iterable[Mapping[str, Any]]
) -> list[str | None]:
    """For each request, its user's training narrative in its service with the latest target
    (``position``), or None where the user has none there."""
    last: dict[tuple[str, str], tuple[int, str]] = {}
    for r in train:
        key = (r["user"], r["service"])
        if key not in last or r["position"] > last[key][0]:
            last[key] = (r["position"], r["text"])
    return [
        last[(r["user"], r["service"])][1] if (r["user"], r["service"]) in last else None for r in requests
    ]
