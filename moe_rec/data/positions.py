"""Token samples -> model batches: left-padded token-level requests (:func:`left_pad`), and
item-level batches, one position per event (``moe_rec.model.item_model``).

The sequences stage writes every sample as tokens: ``[BOS]``, then ``[service][c1]..[cL][dedup]``
per event, and for a ``valid`` / ``test`` request the asked service's token at the end. The
item-level model reads the same samples regrouped: position 0 is ``[BOS]`` alone, position k the
k-th event's ``S = L + 2`` tokens, so nothing is stored twice and both models train on the same
files. An evaluation request's trailing service token becomes the query: the service whose item
the last position must predict. A text token (``[CRITIQUE]``, ``[EXPLAIN]``, ``[EOS]``, a subword)
is a position of its own; the text after ``[EXPLAIN]`` up to ``[EOS]`` is a narrative, which the
model learns to write (``text_labels``).

:func:`item_batch` pads a list of samples into tensors::

    item_tokens     (B, T, S)   each position's tokens, [PAD]-filled
    domain_ids      (B, T)      service index of each position ([BOS] takes the first event's)
    attention_mask  (B, T)      1 for real positions
    user_ids        (B,)        hashed user buckets
    labels          (B, T, P)   train samples: each event's code indices (P = L + 1), -100 elsewhere
    text_labels     (B, T)      train samples with text: each narrative position's own text class
                                (subword id, or text_size for [EOS]), -100 elsewhere
    query_services  (B, T)      requests: the asked service's token at every position
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.vocab import BOS, CRITIQUE, EOS, EXPLAIN, PAD, Vocabulary

TEXT_POSITION_TOKENS = frozenset({CRITIQUE, EXPLAIN, EOS})  # special tokens that are positions of their own


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


class Positions(NamedTuple):
    """One sample as positions (:func:`split_positions`)."""

    tokens: np.ndarray  # (T, S) each position's tokens, [BOS] alone first
    domains: np.ndarray  # (T,) each position's service index
    query: int | None  # the trailing asked-service token of a request (None for a training sample)
    starts: np.ndarray  # (T,) index in the sample's tokens where each position starts


def split_positions(input_ids: Sequence[int], domain_ids: Sequence[int], vocab: Vocabulary) -> Positions:
    """One sample's tokens as positions.

    Raises:
        ValueError: when the tokens are not ``[BOS]`` + whole events and text tokens (+ one service
            token).
    """
    s = vocab.tokens_per_item
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.size == 0 or ids[0] != BOS:
        raise ValueError("a sample must start with [BOS]")
    body, query = ids[1:], None
    if ((body < vocab.service_offset) | (body >= vocab.text_offset)).any():
        return _walk_positions(ids, np.asarray(domain_ids, dtype=np.int64), vocab)
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
    starts = np.concatenate([[0], np.arange(1, 1 + n * s, s)])
    return Positions(tokens, np.concatenate([domains[:1], event_domains]), query, starts)


def _walk_positions(ids: np.ndarray, domains: np.ndarray, vocab: Vocabulary) -> Positions:
    """:func:`split_positions` of a sample with text: token by token, an event wherever a service
    token starts ``S`` tokens, a position per text token."""
    s, n = vocab.tokens_per_item, len(ids)
    rows, doms, starts, query, i = [[BOS] + [PAD] * (s - 1)], [domains[0]], [0], None, 1
    while i < n:
        tok = int(ids[i])
        if vocab.service_offset <= tok < vocab.code_offset:
            if i == n - 1:  # the asked service closes a request
                query = tok
                break
            if i + s > n:
                raise ValueError(
                    f"the event at token {i} is cut short: {n - i} of {s} tokens (not whole events)"
                )
            rows.append(ids[i : i + s].tolist())
            width = s
        elif tok in TEXT_POSITION_TOKENS or vocab.is_text(tok):
            rows.append([tok] + [PAD] * (s - 1))
            width = 1
        else:
            raise ValueError(f"token {tok} ({vocab.token_name(tok)}) at {i} starts neither an event nor text")
        doms.append(domains[i])
        starts.append(i)
        i += width
    return Positions(
        np.asarray(rows, dtype=np.int64), np.asarray(doms, dtype=np.int64), query, np.asarray(starts)
    )


def text_labels(tokens: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """(T,) each position's text class inside a narrative (after ``[EXPLAIN]``, up to and with
    ``[EOS]``): its subword id, or ``text_size`` for ``[EOS]``; -100 elsewhere."""
    first = tokens[:, 0]
    out = np.full(len(first), IGNORE_INDEX, dtype=np.int64)
    inside = False
    for t, tok in enumerate(first.tolist()):
        if inside and vocab.is_text(tok):
            out[t] = tok - vocab.text_offset
        elif inside and tok == EOS:
            out[t], inside = vocab.text_size, False
        else:
            inside = tok == EXPLAIN
    return out


def item_batch(
    rows: Sequence[dict[str, Any]], vocab: Vocabulary, num_user_buckets: int, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    """Pad samples (train rows with ``labels``, or ``valid`` / ``test`` requests) into an item-level
    batch (see the module docstring). An event is a label unless a row's token ``labels`` (one per
    input token) leave its codes out (-100), as a critique sample does for its history. Requests
    are usually left-padded, so the last column is every request's query position."""
    rows = list(rows)  # a datasets.Dataset decodes a row on every index: once here, not per field
    parts = [split_positions(r["input_ids"], r["domain_ids"], vocab) for r in rows]
    b, t, s = len(rows), max(p.tokens.shape[0] for p in parts), vocab.tokens_per_item
    starts = np.asarray([r[0] for r in code_token_ranges(vocab)], dtype=np.int64)  # (P,)
    item_tokens = torch.full((b, t, s), PAD, dtype=torch.long)
    domain_ids = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t, s - 1), IGNORE_INDEX, dtype=torch.long)
    texts = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    query = torch.zeros((b, t), dtype=torch.long)
    for i, (tokens, domains, asked, token_starts) in enumerate(parts):
        n = tokens.shape[0]
        span = slice(t - n, t) if left_pad else slice(0, n)
        item_tokens[i, span] = torch.from_numpy(tokens)
        domain_ids[i] = int(domains[-1] if not left_pad else domains[0])  # padding takes a real domain
        domain_ids[i, span] = torch.from_numpy(domains)
        mask[i, span] = 1
        if "labels" in rows[i]:
            event = (tokens[:, 0] >= vocab.service_offset) & (tokens[:, 0] < vocab.code_offset)  # (n,)
            stored = rows[i]["labels"]
            if len(stored) == len(rows[i]["input_ids"]):  # token labels: an event whose codes have none
                event &= np.asarray(stored)[np.minimum(token_starts + 1, len(stored) - 1)] != IGNORE_INDEX
            codes = np.where(event[:, None], tokens[:, 1:] - starts, IGNORE_INDEX)
            labels[i, span] = torch.from_numpy(codes)
            texts[i, span] = torch.from_numpy(text_labels(tokens, vocab))
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
        if vocab.text_size:
            batch["text_labels"] = texts
    if parts[0].query is not None:
        batch["query_services"] = query
    return batch


def flat_list_column(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column of integers without decoding rows: (every row's values in one int64 array,
    the row of each value, (B,) each row's length)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col  # row indices across chunks
    return (
        pc.list_flatten(col).to_numpy().astype(np.int64),
        pc.list_parent_indices(col).to_numpy(),
        pc.list_value_length(col).to_numpy(),
    )


def columnar_item_batch(
    table: pa.Table, vocab: Vocabulary, num_user_buckets: int
) -> dict[str, torch.Tensor] | None:
    """:func:`item_batch` of training samples (right-padded) read from Arrow columns (``input_ids``,
    ``domain_ids``, ``labels`` of one token each, ``user``) with array operations instead of a row
    at a time: decoding rows into Python lists and walking them costs about 10 times as much, and on
    a GPU it, not the model, sets the pace of a step.

    Returns ``None`` when a sample is anything but ``[BOS]`` + whole events with token labels (a
    text token, a request's trailing service token, cut events): :func:`item_batch` takes those
    (and explains what is wrong).
    """
    if "labels" not in table.column_names:
        return None
    ids, _, lengths = flat_list_column(table.column("input_ids"))
    domains, _, _ = flat_list_column(table.column("domain_ids"))
    stored, _, label_lengths = flat_list_column(table.column("labels"))
    s = vocab.tokens_per_item
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (B,) where each sample starts
    is_first = np.zeros(len(ids), dtype=bool)
    is_first[first[lengths > 0]] = True
    body = ids[~is_first]
    plain = (
        (lengths > 0).all()
        and (label_lengths == lengths).all()
        and (ids[first] == BOS).all()
        and ((lengths - 1) % s == 0).all()
        and ((body >= vocab.service_offset) & (body < vocab.text_offset)).all()
    )
    if not plain:
        return None
    n = (lengths - 1) // s  # (B,) events per sample
    b, t = len(lengths), int(n.max()) + 1
    event = np.arange(t - 1)[None, :] < n[:, None]  # (B, T-1) real event positions
    at = np.where(event, first[:, None] + 1 + np.arange(t - 1)[None, :] * s, 0)  # each event's first token
    tokens = np.full((b, t, s), PAD, dtype=np.int64)
    tokens[:, 0, 0] = BOS
    tokens[:, 1:] = np.where(event[..., None], ids[at[..., None] + np.arange(s)], PAD)
    doms = np.concatenate([domains[first][:, None], domains[at]], axis=1)  # (B, T)
    real = np.concatenate([np.ones((b, 1), dtype=bool), event], axis=1)
    doms = np.where(real, doms, doms[np.arange(b), n][:, None])  # padding takes the last position's
    lead = tokens[:, 1:, 0]
    labelled = (
        event & (lead >= vocab.service_offset) & (lead < vocab.code_offset) & (stored[at + 1] != IGNORE_INDEX)
    )
    starts = np.asarray([r[0] for r in code_token_ranges(vocab)], dtype=np.int64)  # (P,)
    labels = np.full((b, t, s - 1), IGNORE_INDEX, dtype=np.int64)
    labels[:, 1:] = np.where(labelled[..., None], tokens[:, 1:, 1:] - starts, IGNORE_INDEX)
    batch = {
        "item_tokens": torch.from_numpy(tokens),
        "domain_ids": torch.from_numpy(doms),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
        "user_ids": torch.tensor(
            [user_bucket(u, num_user_buckets) for u in table.column("user").to_pylist()]
        ),
        "labels": torch.from_numpy(labels),
    }
    if vocab.text_size:  # no narrative here
        batch["text_labels"] = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    return batch
