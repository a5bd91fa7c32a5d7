"""Recall / NDCG of an ensemble of item-level runs: per request, each run's softmax over the asked
service's items (its exact scores / P, as a teacher's in moe_rec.train.distill) averaged, then
ranked; the same metrics as ``moe-rec eval`` (moe_rec.eval.metrics), on one run's requests.

    python tools/ensemble_eval.py --runs runs/beauty-s1 runs/beauty-s2 --split test

What an ensemble of several per-service models scores, beside the one model distilled from them
(docs/RESULTS.md, "Two teachers per service"). Every run must share one SID table (e.g. seeds of
one recipe with ``sids/`` linked); items of the request's history are not excluded (the Amazon
protocol's ``eval.exclude_seen: false``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moe_rec.console import track
from moe_rec.data.positions import item_batch
from moe_rec.data.schema import DataError
from moe_rec.errors import MoeRecError
from moe_rec.eval.exact import (
    ServiceCatalogue,
    mean_probability,
    request_log_probs,
    request_vocabulary,
    service_scores,
)
from moe_rec.eval.metrics import RankingMetrics
from moe_rec.model import MoERecForItemPrediction
from moe_rec.sid.table import SIDTable
from moe_rec.train.checkpoint import load_model
from moe_rec.train.data import load_split


def ensemble_log_probs(
    models: Sequence[MoERecForItemPrediction], table: SIDTable, catalogue: ServiceCatalogue,
    rows: Sequence[dict[str, Any]], service: str, vectors: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, N_s) log of the models' mean probability of every item of ``service`` (columns:
    ``catalogue.rows[service]``'s order) for requests ``rows`` that all ask for it; ``vectors``:
    each model's :meth:`~MoERecForItemPrediction.item_table` when the caller made them once."""
    vectors = vectors if vectors is not None else [model.item_table() for model in models]
    per_model = []
    for model, item_vectors in zip(models, vectors, strict=True):
        batch = item_batch(
            rows, request_vocabulary(model, table), model.config.num_user_buckets, left_pad=True
        )
        log_probs, query, own = request_log_probs(model, batch)
        scores = service_scores(log_probs, service, catalogue, query, item_vectors, own)
        per_model.append(torch.log_softmax(scores.double() / table.codes.shape[1], dim=1))
    return mean_probability(per_model)


def evaluate_ensemble(
    models: Sequence[MoERecForItemPrediction], table: SIDTable, requests: Sequence[dict[str, Any]],
    split: str, batch_size: int = 256,
) -> dict[str, float]:  # fmt: skip
    """The metrics of ``moe-rec eval`` (``<split>/...`` keys) for the ensemble's rankings."""
    catalogue = ServiceCatalogue(table)
    metrics = RankingMetrics(list(table.vocabulary().services), prefix=split)
    k = max(metrics.ks)
    by_service: dict[str, list[dict[str, Any]]] = {}
    for r in requests:
        by_service.setdefault(r["service"], []).append(r)
    batches = [
        (s, rows[i : i + batch_size])
        for s, rows in by_service.items()
        for i in range(0, len(rows), batch_size)
    ]
    vectors = [model.item_table() for model in models]  # the weights stay fixed: once, not per batch
    for service, rows in track(batches, f"ensemble {split}"):
        lp = ensemble_log_probs(models, table, catalogue, rows, service, vectors)
        top = torch.topk(lp, min(k, lp.shape[1]), dim=1).indices
        ranked = catalogue.rows[service][top]
        target = torch.from_numpy(table.rows([service] * len(rows), [r["target_item"] for r in rows])).long()
        metrics.update(ranked, target, [service] * len(rows))
    return metrics.compute()


def load_runs(runs: Sequence[str], tag: str) -> tuple[list[MoERecForItemPrediction], SIDTable]:
    """Each run's ``tag`` checkpoint and the SID table they share; SystemExit naming the run that
    cannot be read, holds a token-level model, or has another table."""
    models, table = [], None
    for run in runs:
        try:
            model = load_model(Path(run) / "checkpoints", tag)
            own = SIDTable.load(Path(run) / "sids")
        except (MoeRecError, OSError) as e:  # a missing or corrupt checkpoint or SID table, named
            raise SystemExit(f"error: --runs {run}: {e}") from None
        if not isinstance(model, MoERecForItemPrediction):
            raise SystemExit(
                f"error: --runs {run} holds a token-level model; an ensemble averages exact item scores"
            )
        if table is None:
            table = own
        elif (
            own.services != table.services
            or list(own.item_ids) != list(table.item_ids)
            or not torch.equal(own.codes, table.codes)
        ):
            raise SystemExit(
                f"error: --runs {run}: its SID table differs from {runs[0]}'s; an ensemble needs one table"
            )
        models.append(model.eval())
    assert table is not None
    return models, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="item-level run directories (checkpoints/, sids/)"
    )
    parser.add_argument("--checkpoint", default="best", help="the tag read in every run (default best)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--batch-size", type=int, default=256, help="requests scored at once")
    args = parser.parse_args()
    models, table = load_runs(args.runs, args.checkpoint)
    try:
        requests = load_split(Path(args.runs[0]) / "sequences", args.split).to_list()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    with torch.no_grad():
        metrics = evaluate_ensemble(models, table, requests, args.split, args.batch_size)
    json.dump({"runs": args.runs, "checkpoint": args.checkpoint, "requests": len(requests), "metrics": metrics},
              sys.stdout, indent=2)  # fmt: skip
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
