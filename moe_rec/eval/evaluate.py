"""Generative retrieval evaluation: constrained beam search over a split's leave-one-out samples,
then Recall@K / NDCG@K per service against the held-out item (full ranking over the service's
items: the beams range over every valid ID of the service, nothing is sampled).

The model comes in as a ``MoERecForCausalLM`` (from a checkpoint or a bundle, the caller's
business), the items as the run's ``SIDTable``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from moe_rec.console import progress
from moe_rec.data.positions import left_pad
from moe_rec.data.sequences import user_bucket
from moe_rec.data.vocab import Vocabulary
from moe_rec.eval.beam_search import constrained_beam_search
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.exact import evaluate_exact
from moe_rec.eval.metrics import RankingMetrics
from moe_rec.eval.predictions import PredictionWriter
from moe_rec.model import MoERecForCausalLM, MoERecForItemPrediction
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import SIDTrie


def history_codes(input_ids: Sequence[int], vocab: Vocabulary, service: str) -> torch.Tensor:
    """Full IDs (n, L+1) of the context's items of ``service`` (the prompt's items after ``[BOS]``)."""
    n = vocab.tokens_per_item
    body = list(input_ids[1:])
    codes = []
    for k in range(0, len(body) - len(body) % n, n):
        item_service, item_codes = vocab.decode_item(body[k : k + n])
        if item_service == service:
            codes.append(item_codes)
    return torch.tensor(codes, dtype=torch.long).reshape(-1, vocab.levels + 1)


def rank_requests(
    model: MoERecForCausalLM, table: SIDTable, trie: SIDTrie, rows: Sequence[dict[str, Any]], cfg: EvalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained beam search for a batch of leave-one-out samples (``valid`` / ``test`` rows).

    Returns:
        ranked (B, W) table rows of the ``cfg.beam_width`` best items, best first (-1: none), and
        target (B,) the table row of each sample's held-out item.
    """
    device = next(model.parameters()).device
    vocab = table.vocabulary()
    services = [r["service"] for r in rows]
    ids, mask, domains = left_pad(rows)
    users = (
        torch.tensor([user_bucket(r["user"], model.config.num_user_buckets) for r in rows])
        if model.config.router_mode == "domain_user"
        else None
    )
    exclude = [history_codes(r["input_ids"], vocab, r["service"]) for r in rows] if cfg.exclude_seen else None
    codes, _ = constrained_beam_search(
        model,
        trie,
        vocab,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        domain_ids=domains.to(device),
        user_ids=users.to(device) if users is not None else None,
        services=services,
        beam_width=cfg.beam_width,
        exclude_codes=exclude,
    )  # (B, W, L+1)
    b, w, depth = codes.shape
    flat_services = [s for s in services for _ in range(w)]
    ranked = table.rows_for_codes(flat_services, codes.reshape(b * w, depth).cpu()).view(b, w)
    target = torch.from_numpy(table.rows(services, [r["target_item"] for r in rows])).long()
    return ranked, target


def length_order(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of ``rows``, shortest history first: a batch of similar lengths pads its prompts
    little (the metrics are sums over requests, so the order does not change them)."""
    return sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))


def by_length(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` in :func:`length_order`."""
    return [rows[i] for i in length_order(rows)]


@torch.no_grad()
def evaluate_model(
    model: MoERecForCausalLM | MoERecForItemPrediction,
    table: SIDTable,
    samples: datasets.Dataset,
    cfg: EvalConfig,
    cold: set[tuple[str, str]] | None = None,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Recall@K / NDCG@K (K = 5, 10, 20) per service and overall for ``samples`` (eval rows of one
    split): by exact scoring for the item-level model, by constrained beam search for the token-level
    one. ``cold``: items kept out of training; the item-level model then also reports cold / warm
    targets. ``predictions``: also write every request's ranking there (:mod:`moe_rec.eval.predictions`)."""
    n = len(samples) if not cfg.max_samples else min(cfg.max_samples, len(samples))
    requests = samples.select(range(n)).to_list()
    with PredictionWriter(predictions, requests, table) if predictions else contextlib.nullcontext() as save:
        if isinstance(model, MoERecForItemPrediction):
            return evaluate_exact(model, table, requests, cfg, prefix=cfg.split, cold=cold, on_ranked=save)
        model.eval()
        trie = table.trie().to(next(model.parameters()).device)
        metrics = RankingMetrics(list(table.vocabulary().services), prefix=cfg.split)
        order = length_order(requests)
        with progress() as bar:
            task = bar.add_task(f"eval {cfg.split}", total=n)
            for start in range(0, n, cfg.batch_size):
                index = order[start : start + cfg.batch_size]
                rows = [requests[i] for i in index]
                ranked, target = rank_requests(model, table, trie, rows, cfg)
                metrics.update(ranked, target, [r["service"] for r in rows])
                if save is not None:
                    save(index, ranked)
                bar.advance(task, len(rows))
    metrics.reduce()
    return metrics.compute()
