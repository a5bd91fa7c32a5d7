"""Token samples -> model batches: left-padded token-level requests (:func:`left_pad`), and
item-level batches, one position per event (``moe_rec.model.item_model``).

The sequences stage writes every sample as tokens: ``[BOS]``, then ``[service][c1]..[cL][dedup]``
per event, and for a ``valid`` / ``test`` request the asked service's token at the end. The
item-level model reads the same samples regrouped: position 0 is ``[BOS]`` alone, position k the
k-th event's ``S = L + 2`` tokens, so nothing is stored twice and both models train on the same
files. An evaluation request's trailing service token becomes the query: the service whose item
the last position must predict.

:func:`item_batch` pads a list of samples into tensors::

    item_tokens     (B, T, S)   each position's tokens, [PAD]-filled
    domain_ids      (B, T)      service index of each position ([BOS] takes the first event's)
    attention_mask  (B, T)      1 for real positions
    user_ids        (B,)        hashed user buckets
    labels          (B, T, P)   train samples: each event's code indices (P = L + 1), -100 elsewhere
    query_services  (B, T)      requests: the asked service's token at every position
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.vocab import BOS, PAD, Vocabulary


def left_pad(rows: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad samples' ``input_ids`` / ``domain_ids``; returns input_ids, attention_mask, domain_ids (B, T)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    domains = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, width - n :] = torch.tensor(r["input_ids"])
        mask[b, width - n :] = 1
        domains[b, width - n :] = torch.tensor(r["domain_ids"])
        domains[b, : width - n] = r["domain_ids"][0]
    return ids, mask, domains


def code_token_ranges(vocab: Vocabulary) -> list[list[int]]:
    """Token id range ``[start, stop)`` of each code position of an item (L levels, then dedup)."""
    return [list(vocab.code_token_range(depth)) for depth in range(vocab.levels + 1)]


def split_positions(
    input_ids: Sequence[int], domain_ids: Sequence[int], vocab: Vocabulary
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """One sample's tokens as positions.

    Returns:
        tokens (T, S) with ``[BOS]`` alone first, domains (T,), and the trailing asked-service token
        of an evaluation request (None for a training sample).

    Raises:
        ValueError: when the tokens are not ``[BOS]`` + whole events (+ one service token).
    """
    s = vocab.tokens_per_item
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.size == 0 or ids[0] != BOS:
        raise ValueError("a sample must start with [BOS]")
    body, query = ids[1:], None
    if body.size % s == 1:  # an evaluation request: the asked service's token closes it
        body, query = body[:-1], int(body[-1])
    if body.size % s:
        raise ValueError(f"{body.size} tokens after [BOS] are not whole events of {s} tokens")
    n = body.size // s
    tokens = np.full((n + 1, s), PAD, dtype=np.int64)
    tokens[0, 0] = BOS
    tokens[1:] = body.reshape(n, s)
    domains = np.asarray(domain_ids, dtype=np.int64)
    event_domains = domains[1 : 1 + n * s : s]  # the service token of each event
    return tokens, np.concatenate([domains[:1], event_domains]), query


def item_batch(
    rows: Sequence[dict[str, Any]], vocab: Vocabulary, num_user_buckets: int, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Pad samples (train rows with ``labels``, or ``valid`` / ``test`` requests) into an item-level
    batch (see the module docstring). Requests are usually left-padded, so the last column is every
    request's query position."""
    parts = [split_positions(r["input_ids"], r["domain_ids"], vocab) for r in rows]
    b, t, s = len(rows), max(p[0].shape[0] for p in parts), vocab.tokens_per_item
    starts = np.asarray([r[0] for r in code_token_ranges(vocab)], dtype=np.int64)  # (P,)
    item_tokens = torch.full((b, t, s), PAD, dtype=torch.long)
    domain_ids = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t, s - 1), IGNORE_INDEX, dtype=torch.long)
    query = torch.zeros((b, t), dtype=torch.long)
    for i, (tokens, domains, asked) in enumerate(parts):
        n = tokens.shape[0]
        span = slice(t - n, t) if left_pad else slice(0, n)
        item_tokens[i, span] = torch.from_numpy(tokens)
        domain_ids[i] = int(domains[-1] if not left_pad else domains[0])  # padding takes a real domain
        domain_ids[i, span] = torch.from_numpy(domains)
        mask[i, span] = 1
        if "labels" in rows[i]:
            labels[i, span][1:] = torch.from_numpy(tokens[1:, 1:] - starts)
        if asked is not None:
            query[i] = asked
    batch = {
        "item_tokens": item_tokens,
        "domain_ids": domain_ids,
        "attention_mask": mask,
        "user_ids": torch.tensor([user_bucket(r["user"], num_user_buckets) for r in rows]),
    }
    if "labels" in rows[0]:
        batch["labels"] = labels
    if parts[0][2] is not None:
        batch["query_services"] = query
    return batch
