"""Exact full-catalogue ranking for the item-level model, and the one evaluation loop that both
training-time validation and ``moe-rec eval`` run.

An item's score is the sum of its codes' log-probabilities under the model's parallel heads
(:mod:`moe_rec.model.item_model`), so ranking every item of a service is a gather over the SID
table: for each code position p, ``scores += log_probs[:, p, codes[:, p]]``. Only the asked
service's items are scored, so other services' items can never be returned. Items are scored in
chunks of ``chunk_items`` and a running top-k is kept, so a million-item catalogue needs memory
for one (B, chunk) block. :func:`reference_scores` is the plain loop the fast path is tested
against. :func:`target_ranks` places a known target in the same ranking (its rank and the
cross-entropy of a softmax over the scores), at the last position of requests or, through
:func:`position_log_probs`, at every position of a training window (the privacy audit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from moe_rec.console import progress
from moe_rec.data.cold_start import cold_groups, cold_labels
from moe_rec.data.positions import code_token_ranges, item_batch, split_positions
from moe_rec.data.text_samples import plain_request
from moe_rec.data.vocab import CRITIQUE, Vocabulary
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.metrics import RankingMetrics
from moe_rec.model import MoERecForItemPrediction
from moe_rec.model.item_model import gather_scores
from moe_rec.sid.table import SIDTable


def item_scores(log_probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Scores (B, N) of items with full IDs ``codes`` (N, P) under ``log_probs`` (B, P, K)."""
    return gather_scores(_by_code(log_probs), codes).T


def _by_code(log_probs: torch.Tensor) -> torch.Tensor:
    """(B, P, K) -> (P, K, B) contiguous: a code's scores for every request lie in one row."""
    return log_probs.permute(1, 2, 0).contiguous()


def reference_scores(log_probs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """:func:`item_scores` as a plain float64 loop over requests, items and codes (for tests)."""
    lp, c = log_probs.double().tolist(), codes.tolist()
    return torch.tensor(
        [[sum(row[p][code] for p, code in enumerate(item)) for item in c] for row in lp], dtype=torch.float64
    )


def top_items(
    log_probs: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk_items: int = 65_536,
    query: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    adjust: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of N items for each request, exactly (equal scores: lower index first).

    Args:
        log_probs: (B, P, K) per-code log-probabilities.
        codes: (N, P) the candidate items' full IDs.
        k: how many to return (fewer when N < k).
        exclude: (B, N) True for items a request must not get (e.g. already seen).
        chunk_items: items scored at once.
        query, vectors: (B, D) and (N, D): the item-level model's per-item term, ``P x query .
            vector`` added to each score (P code positions: the model trains on mean code logits).
        adjust: (B,) an item index per request (-1: none) and (B,) an amount, ``P x amount`` added
            to that one item's score (the item model's own-item correction of its text prior); or
            (B, J) and (B, J): J such corrections a request (:func:`with_plain`).

    Returns:
        scores (B, k') and item indices (B, k') into ``codes``, best first, k' = min(k, N).
    """
    b, n = log_probs.shape[0], codes.shape[0]
    by_code = _by_code(log_probs)
    query, vectors = _trimmed(query, vectors)
    best_s = log_probs.new_full((b, 0), -math.inf)
    best_i = torch.zeros((b, 0), dtype=torch.long, device=log_probs.device)
    for start in range(0, n, chunk_items):
        s = _chunk_scores(by_code, codes, start, chunk_items, query, vectors, adjust)  # (n_chunk, B)
        if exclude is not None:
            s = s.masked_fill(exclude[:, start : start + chunk_items].T, -math.inf)
        top_s, top_i = torch.topk(s, min(k, s.shape[0]), dim=0)  # (k', B)
        cand_s, cand_i = torch.cat([best_s, top_s.T], 1), torch.cat([best_i, top_i.T + start], 1)
        # order by index, then stably by descending score: equal scores keep the lower index first
        by_index = torch.argsort(cand_i, dim=1)
        cand_s, cand_i = cand_s.gather(1, by_index), cand_i.gather(1, by_index)
        order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return best_s, best_i


def used_width(query: torch.Tensor) -> int:
    """The columns of ``query`` (B, D) up to its last non-zero one: the item-level model's critique
    parts come last (:meth:`~MoERecForItemPrediction.item_query`) and are zero in every request
    without a critique, so a batch of plain requests skips them (a column per catalogue phrase
    with ``item_phrases``)."""
    used = (query != 0).any(0).nonzero()
    return int(used[-1]) + 1 if len(used) else 0


def _trimmed(
    query: torch.Tensor | None, vectors: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``query`` and ``vectors`` cut to :func:`used_width` columns, once per call rather than per
    chunk of items (no query: both unchanged)."""
    if query is None or vectors is None:
        return query, vectors
    w = used_width(query)
    return query[:, :w], vectors[:, :w]


def _chunk_scores(
    by_code: torch.Tensor,
    codes: torch.Tensor,
    start: int,
    size: int,
    query: torch.Tensor | None,
    vectors: torch.Tensor | None,
    adjust: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Scores (n_chunk, B) of items ``codes[start : start + size]`` (see :func:`top_items`)."""
    s = gather_scores(by_code, codes[start : start + size])  # (n_chunk, B)
    if vectors is not None:
        s += codes.shape[1] * (vectors[start : start + size].float() @ query.float().T)
    if adjust is not None:  # (B,) or (B, J): J corrections a request
        index, amount = adjust
        for idx, amt in zip(index.reshape(len(index), -1).T, amount.reshape(len(amount), -1).T, strict=True):
            inside = ((idx >= start) & (idx < start + s.shape[0])).nonzero().flatten()  # requests
            s[idx[inside] - start, inside] += codes.shape[1] * amt[inside].float()
    return s


def target_ranks(
    log_probs: torch.Tensor,
    codes: torch.Tensor,
    target: torch.Tensor,
    chunk_items: int = 65_536,
    query: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    adjust: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each request's target lands in the ranking :func:`top_items` makes, and its loss.

    Args:
        log_probs, codes, chunk_items, query, vectors, adjust: as :func:`top_items`.
        target: (B,) index into ``codes`` of each request's target item.

    Returns:
        rank (B,), 1 for the best item (equal scores: the lower index first, as :func:`top_items`),
        and loss (B,): ``logsumexp`` of every item's score minus the target's, the cross-entropy of
        a softmax over the N items with their scores as logits.
    """
    b, n = log_probs.shape[0], codes.shape[0]
    by_code = _by_code(log_probs)
    query, vectors = _trimmed(query, vectors)
    target = target.to(log_probs.device)
    requests = torch.arange(b, device=log_probs.device)
    chunks = list(range(0, n, chunk_items))
    scored = log_probs.new_full((b,), math.nan)
    total = log_probs.new_full((b,), -math.inf)
    cached = None
    for start in chunks:  # first pass: the target's own score, and the normaliser
        s = _chunk_scores(by_code, codes, start, chunk_items, query, vectors, adjust)
        inside = (target >= start) & (target < start + s.shape[0])
        scored[inside] = s[target[inside] - start, requests[inside]]
        total = torch.logaddexp(total, torch.logsumexp(s, dim=0))
        cached = s if len(chunks) == 1 else None
    above = torch.zeros(b, dtype=torch.long, device=log_probs.device)
    for start in chunks:  # second pass: how many items rank before the target
        s = (
            cached
            if cached is not None
            else _chunk_scores(by_code, codes, start, chunk_items, query, vectors, adjust)
        )
        index = torch.arange(start, start + s.shape[0], device=s.device)[:, None]  # (n_chunk, 1)
        before = (s > scored) | ((s == scored) & (index < target))
        above += before.sum(0)
    return above + 1, total - scored


class ServiceCatalogue:
    """The items of each service as table rows and full IDs, on one device (built once per run)."""

    def __init__(self, table: SIDTable, device: torch.device | str = "cpu") -> None:
        self.table = table
        self.rows: dict[str, torch.Tensor] = {}  # service -> (N_s,) table rows
        self.codes: dict[str, torch.Tensor] = {}  # service -> (N_s, P) full IDs
        self.local = torch.full((len(table),), -1, dtype=torch.long)  # table row -> index in its service
        for i, service in enumerate(table.services):
            rows = (table.service_index == i).nonzero().flatten()
            self.rows[service] = rows.to(device)
            self.codes[service] = table.codes[rows].to(device)
            self.local[rows] = torch.arange(len(rows))

    def local_of(self, rows: torch.Tensor, service: str) -> torch.Tensor:
        """(...) each table row's index among ``service``'s items; -1 for a row of another service
        or -1 (no item)."""
        rows = rows.long().cpu()
        safe = rows.clamp_min(0)
        mine = (rows >= 0) & (self.table.service_index[safe] == self.table.services.index(service))
        return torch.where(mine, self.local[safe], -1)


# a batch's per-code log-probabilities, query and own-item correction (request_log_probs)
Parts = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]


@torch.no_grad()
def position_log_probs(
    model: MoERecForItemPrediction, batch: dict[str, torch.Tensor], logits_to_keep: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-code log-probabilities (B, T', P, K) of the next item at every position of an item-level
    batch (:func:`moe_rec.data.positions.item_batch`, ``labels`` left out: with none, each position
    asks for the next position's service), or at the last ``logits_to_keep``; the query (B, T', D')
    the per-item term reads (None without ``item_embedding``); and with ``item_text_prior`` the
    own-item correction: (B, T') table row of the item whose text the prior reads at each position
    (:meth:`~moe_rec.model.item_model.MoERecForItemPrediction.prior_rows`, -1: none) and what its
    score loses (None otherwise)."""
    device = next(model.parameters()).device
    if model.config.router_mode != "domain_user":
        batch = {k: v for k, v in batch.items() if k != "user_ids"}
    out = model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=logits_to_keep)
    query = out.hidden_states
    own = None
    if model.text_prior is not None:
        tokens = batch["item_tokens"].to(device)
        asked = model.asked_services(
            tokens, batch["query_services"].to(device) if "query_services" in batch else None
        )
        rows = model.prior_rows(tokens, asked)[:, -out.logits.shape[1] :]  # (B, T')
        own = (rows, model.own_item_term(query, rows))
    return torch.log_softmax(out.logits.float(), dim=-1), query, own


def request_log_probs(model: MoERecForItemPrediction, batch: dict[str, torch.Tensor]) -> Parts:
    """:func:`position_log_probs` at the last position of a left-padded batch of requests
    (``item_batch(..., left_pad=True)``): (B, P, K), the query (B, D') and the own-item correction
    ((B,), (B,))."""
    log_probs, query, own = position_log_probs(model, batch, logits_to_keep=1)
    return (
        log_probs[:, -1],
        query[:, -1] if query is not None else None,
        (own[0][:, -1], own[1][:, -1]) if own is not None else None,
    )


def with_plain(critique: Parts, plain: Parts, weight: torch.Tensor) -> Parts:
    """:func:`request_log_probs` of critique requests plus ``weight`` (B,) x those of the same
    requests without their critique: an item's exact score is linear in the three parts, so this
    ranks by score(item | critique) + weight x score(item | history alone), i.e. by log p(item |
    critique) + weight x log p(item | history) (a constant per request changes no ranking): the
    critique's reading, tempered by what the model knows of the user without it. The own-item
    corrections of both are kept, (B, 2) (a critique's last word reads no own item, the plain
    request its last)."""
    w = weight.to(critique[0].device, critique[0].dtype)
    log_probs = critique[0] + w[:, None, None] * plain[0]
    query = critique[1]
    if query is not None and plain[1] is not None:
        query = query + w[:, None].to(query.dtype) * plain[1]
    own = critique[2]
    if own is not None and plain[2] is not None:
        own = (
            torch.stack([own[0], plain[2][0]], 1),
            torch.stack([own[1], w.to(own[1].dtype) * plain[2][1]], 1),
        )
    return log_probs, query, own


def request_parts(
    model: MoERecForItemPrediction,
    rows: Sequence[dict[str, Any]],
    vocab: Vocabulary,
    user_ids: torch.Tensor | None = None,
    plain_weight: float | None = None,
    plain: Parts | None = None,
) -> Parts:
    """:func:`request_log_probs` of requests ``rows`` (``input_ids``, ``domain_ids``, ``user``; one
    left-padded batch; ``user_ids`` (B,) instead of hashing ``user``), where a request holds a
    critique plus ``plain_weight`` (default: the model's ``critique_plain_weight``) x the parts of
    the same request without it (:func:`with_plain`); requests without a critique are unchanged.
    ``plain``: those parts (of ``[plain_request(r) for r in rows]``) when the caller has them."""

    def parts_of(requests: Sequence[dict[str, Any]]) -> Parts:
        batch = item_batch(requests, vocab, model.config.num_user_buckets, left_pad=True)
        if user_ids is not None:
            batch["user_ids"] = user_ids
        return request_log_probs(model, batch)

    parts = parts_of(rows)
    weight = getattr(model.config, "critique_plain_weight", 0.0) if plain_weight is None else plain_weight
    steered = torch.tensor([CRITIQUE in r["input_ids"] for r in rows])
    if not weight or not bool(steered.any()):
        return parts
    if plain is None:
        plain = parts_of([plain_request(r) for r in rows])
    return with_plain(parts, plain, weight * steered.float())


def service_scores(
    log_probs: torch.Tensor,
    service: str,
    catalogue: ServiceCatalogue,
    query: torch.Tensor | None = None,
    item_vectors: torch.Tensor | None = None,
    own: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact scores (B, N_s) of every item of ``service`` (columns: ``catalogue.rows[service]``'s
    order) for requests that all ask for it: what :func:`top_for_requests` ranks, whole, for a
    caller that needs every item's score (a teacher's softmax over its catalogue)."""
    codes = catalogue.codes[service]
    vectors = item_vectors[catalogue.rows[service]] if item_vectors is not None else None
    adjust = (catalogue.local_of(own[0], service).to(codes.device), own[1]) if own is not None else None
    query, vectors = _trimmed(query, vectors)
    return _chunk_scores(_by_code(log_probs), codes, 0, len(codes), query, vectors, adjust).T


def mean_probability(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean probability of several models' log-probabilities over the same items
    (each (B, N)): an ensemble averages probabilities, not log-probabilities."""
    stacked = torch.stack(list(log_probs))
    return torch.logsumexp(stacked, 0) - math.log(len(stacked))


def top_for_requests(
    log_probs: torch.Tensor,
    services: Sequence[str],
    catalogue: ServiceCatalogue,
    k: int,
    exclude_rows: Sequence[Sequence[int]] | None = None,
    query: torch.Tensor | None = None,
    item_vectors: torch.Tensor | None = None,
    own: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items of each request's own service, exactly.

    Args:
        log_probs: (B, P, K) per-code log-probabilities of each request.
        services: (B,) the service each request asks for; only its items are scored.
        k: items per request.
        exclude_rows: per request, table rows never to return (e.g. its history's items).
        query, item_vectors: (B, D) and (N_table, D), the per-item term (see :func:`top_items`).
        own: (B,) table rows (-1: none) and (B,) amounts: the own-item correction (``adjust`` of
            :func:`top_items`), applied where the row is an item of the request's service.

    Returns:
        table rows (B, k), best first, and their scores (B, k); -1 / -inf where the service has
        fewer than k items left after exclusion.
    """
    b = len(services)
    ranked = torch.full((b, k), -1, dtype=torch.long)
    scores = torch.full((b, k), -math.inf)
    for service in dict.fromkeys(services):
        mine = [i for i, s in enumerate(services) if s == service]
        codes = catalogue.codes[service]
        exclude = None
        if exclude_rows is not None:
            exclude = torch.zeros(len(mine), codes.shape[0], dtype=torch.bool, device=codes.device)
            for j, i in enumerate(mine):
                local = catalogue.local_of(torch.as_tensor(list(exclude_rows[i]), dtype=torch.long), service)
                exclude[j, local[local >= 0].to(codes.device)] = True
        vectors = item_vectors[catalogue.rows[service]] if item_vectors is not None else None
        adjust = None
        if own is not None:
            adjust = (catalogue.local_of(own[0][mine], service).to(codes.device), own[1][mine])
        top_s, idx = top_items(
            log_probs[mine],
            codes,
            k,
            exclude,
            query=query[mine] if query is not None else None,
            vectors=vectors,
            adjust=adjust,
        )
        picked = catalogue.rows[service][idx].cpu()  # (b_s, k')
        top_s = top_s.cpu()
        picked = torch.where(torch.isneginf(top_s), -1, picked)  # an excluded item is no answer
        ranked[mine, : picked.shape[1]] = picked
        scores[mine, : top_s.shape[1]] = top_s
    return ranked, scores


def ranks_for_requests(
    log_probs: torch.Tensor,
    services: Sequence[str],
    targets: torch.Tensor,
    catalogue: ServiceCatalogue,
    query: torch.Tensor | None = None,
    item_vectors: torch.Tensor | None = None,
    own: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (B,) of each request's target among its service's items by the score
    :func:`top_for_requests` ranks with (1: first), and loss (B,) (:func:`target_ranks`).

    Args:
        log_probs, services, catalogue, query, item_vectors, own: as :func:`top_for_requests`.
        targets: (B,) table row of each request's target, an item of the request's service.
    """
    b = len(services)
    ranks = torch.zeros(b, dtype=torch.long)
    losses = torch.zeros(b)
    for service in dict.fromkeys(services):
        mine = [i for i, s in enumerate(services) if s == service]
        codes = catalogue.codes[service]
        local = catalogue.local_of(targets[mine], service)
        if bool((local < 0).any()):
            raise ValueError(f"a target of a {service} request is not an item of {service}")
        vectors = item_vectors[catalogue.rows[service]] if item_vectors is not None else None
        adjust = None
        if own is not None:
            adjust = (catalogue.local_of(own[0][mine], service).to(codes.device), own[1][mine])
        rank, loss = target_ranks(
            log_probs[mine], codes, local.to(codes.device),
            query=query[mine] if query is not None else None, vectors=vectors, adjust=adjust,
        )  # fmt: skip
        ranks[mine], losses[mine] = rank.cpu(), loss.cpu()
    return ranks, losses


def history_rows(item_tokens: torch.Tensor, service: str, table: SIDTable) -> list[int]:
    """Table rows of the items of ``service`` among one request's positions ``item_tokens`` (T, S)."""
    vocab = table.vocabulary()
    events = item_tokens[item_tokens[:, 0] == vocab.service_token(service)]  # (n, S)
    if not len(events):
        return []
    starts = torch.tensor([start for start, _ in code_token_ranges(vocab)])
    return [int(r) for r in table.rows_for_codes(service, events[:, 1:] - starts) if r >= 0]


def request_history_rows(request: dict[str, Any], vocab: Vocabulary, table: SIDTable) -> list[int]:
    """Table rows of one request's history items in its asked service (``input_ids``,
    ``domain_ids``, ``service``): what ``exclude_seen`` leaves out, what narratives describe."""
    tokens = torch.from_numpy(split_positions(request["input_ids"], request["domain_ids"], vocab).tokens)
    return history_rows(tokens, request["service"], table)


def request_vocabulary(model: MoERecForItemPrediction, table: SIDTable) -> Vocabulary:
    """The vocabulary a request to ``model`` is written in: the SID table's, plus the text tokens of
    a model that reads critiques (``text_token_range``)."""
    vocab, text = table.vocabulary(), model.config.text_token_range
    return dataclasses.replace(vocab, text_size=text[1] - text[0]) if text else vocab


def rank_exact(
    model: MoERecForItemPrediction,
    catalogue: ServiceCatalogue,
    rows: Sequence[dict[str, Any]],
    k: int,
    exclude_seen: bool = False,
    vectors: torch.Tensor | None = None,
    plain_weight: float | None = None,
    parts: Parts | None = None,
) -> torch.Tensor:
    """Table rows (B, k) of the best ``k`` items of each request's service, best first (-1 where
    fewer exist). ``rows`` are ``valid`` / ``test`` requests; ``vectors``: the model's
    :meth:`~MoERecForItemPrediction.item_table` when the caller computed it once for many batches.
    ``plain_weight``: a critique request's scores without it count this many times beside its
    own (:func:`request_parts`; default: the model's ``critique_plain_weight``). ``parts``: the
    requests' :func:`request_parts` when the caller has them (``plain_weight`` then unused)."""
    table = catalogue.table
    vocab = request_vocabulary(model, table)
    services = [r["service"] for r in rows]
    exclude = [request_history_rows(r, vocab, table) for r in rows] if exclude_seen else None
    if parts is None:
        parts = request_parts(model, rows, vocab, plain_weight=plain_weight)
    log_probs, query, own = parts
    vectors = vectors if vectors is not None else model.item_table()
    ranked, _ = top_for_requests(log_probs, services, catalogue, k, exclude, query, vectors, own)
    return ranked


def gathered_item_table(model: MoERecForItemPrediction) -> torch.Tensor | None:
    """:meth:`~MoERecForItemPrediction.item_table`, its weights gathered first where DeepSpeed
    ZeRO-3 partitions them (outside a forward pass a rank holds only its shard); every rank calls it."""
    words = model.model.embed_tokens if model.word_weight is not None else None  # the item words' vectors
    modules = [m for m in (model.item_embed, model.text_proj, words) if m is not None]
    params = [p for m in modules for p in m.parameters()] + (
        [model.text_prior] if model.text_prior is not None else []
    )
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return model.item_table()
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return model.item_table()


def evaluate_exact(
    model: MoERecForItemPrediction,
    table: SIDTable,
    requests: Sequence[dict[str, Any]],
    cfg: EvalConfig,
    *,
    prefix: str,
    catalogue: ServiceCatalogue | None = None,
    show_progress: bool = True,
    cold: set[tuple[str, str]] | None = None,
    on_ranked: Callable[[Sequence[int], torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Recall@K / NDCG@K of ``requests`` (valid / test rows), overall and per service, as
    :meth:`RankingMetrics.compute` reports them; with ``cold`` (the items kept out of training)
    also for ``cold`` and ``warm`` targets. ``on_ranked`` gets each batch's indices into
    ``requests`` and their rankings, table rows (B, max K) best first (e.g. a
    :class:`moe_rec.eval.predictions.PredictionWriter`).

    Under a process group every rank scores its share (``requests[rank::world]``) and the sums
    are reduced; every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively), a rank out of requests scoring the first one again, unscored.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    catalogue = catalogue or ServiceCatalogue(table, next(model.parameters()).device)
    index = sorted(
        range(rank, len(requests), world),
        key=lambda i: (requests[i]["service"], len(requests[i]["input_ids"])),
    )
    mine = [requests[i] for i in index]
    num_batches = math.ceil(math.ceil(len(requests) / world) / cfg.batch_size)
    metrics = RankingMetrics(list(table.vocabulary().services), prefix=prefix, groups=cold_groups(cold))
    k = max(metrics.ks)
    was_training = model.training
    model.eval()
    vectors = gathered_item_table(model)  # (N, D) or None: the weights stay fixed while every batch is ranked
    with progress() as bar:
        task = bar.add_task(f"eval {prefix}", total=len(mine), visible=show_progress and rank == 0)
        for i in range(num_batches):
            chunk = mine[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            ranked = rank_exact(
                model,
                catalogue,
                chunk or requests[:1],
                k,
                cfg.exclude_seen,
                vectors,
                cfg.critique_plain_weight,
            )
            if chunk:
                services, items = [r["service"] for r in chunk], [r["target_item"] for r in chunk]
                target = torch.from_numpy(table.rows(services, items)).long()
                metrics.update(ranked, target, services, cold_labels(services, items, cold))
                if on_ranked is not None:
                    on_ranked(index[i * cfg.batch_size : (i + 1) * cfg.batch_size], ranked)
                bar.advance(task, len(chunk))
    model.train(was_training)
    metrics.reduce()
    return metrics.compute()
