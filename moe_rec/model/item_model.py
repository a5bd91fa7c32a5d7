"""The item-level recommender: one position per event, every code of the next item predicted at
once, every item of a service scored exactly.

Input. A position is a bag of vocabulary tokens, ``item_tokens (B, T, S)``: an event is its
``[service][c1]..[cL][dedup]`` tokens (S = L + 2), the start position is ``[BOS]`` alone (the other
slots ``[PAD]``), and a later text position (a critique word) would be one text token. Its vector is
the mean of its tokens' embeddings times sqrt(D) (the Gemma scale); ``[PAD]`` rows are zero and not
counted. The codebook is the shared vocabulary's, so every service's items live in one space, and
a new item has an input vector from its text-born ID alone.

Decoder. :class:`~moe_rec.model.modeling.MoERecModel` unchanged: Gemma-style blocks, routed MoE.

Heads (RPG, KDD 2025). At position t the query is ``h_t`` plus the embedding of the service asked
next (the next event's in training, the request's at serving time), so the prediction knows which
catalogue it ranks. Each code position p has its own projection ``W_p`` (with ``service_heads``
plus a per-service change ``Delta_p^s``, zero at the start); its logits are the cosine similarity
of ``W_p q`` with the embedding rows of p's codes (tied to the input), divided by a temperature.
An item's score is ``sum_p log softmax(logits_p)[code_p(item)]``: the log-probability of its ID
under independent per-code predictions (:mod:`moe_rec.eval.exact` ranks with it); with
``item_embedding`` an item also has a vector of its own, added to its input positions, whose dot
product with the query (times P) joins its score. With ``item_words`` a position that ends a
critique (a run of text positions opened by ``[CRITIQUE]``) scores each item's words (brand, leaf
category, price band, title, as subwords of the critiques' tokenizer) against the critique's words:
``sum_f sum_s a_f(h_s) cos(e_s, words_f)``, s the critique's positions, ``e_s`` their input
embeddings, ``words_f`` the mean input embedding of the item's field-f subwords and ``a_f(h_s)``
a weight the decoder gives each word in its context (so "not a fan of Revlon" can count against
Revlon and "anything by Maybelline?" for Maybelline). A word the item holds matches itself
exactly from the start, through the one embedding table; other positions get no such term.

Loss (``item_loss``). ``codes``: cross-entropy of every code of the next event, at every position
that has one, averaged over codes and positions. ``items``: one softmax over every item of the next
event's service (the catalogue is handed over once, :meth:`set_train_catalogue`), an item's logit
being the mean of its codes' logits; the per-code normalisers and the 1/P are the same for every
item, so this trains exactly the ranking the test scores; with ``item_loss_balance='services'`` each
asked service's mean loss counts once, not each position. Plus the routers' auxiliary losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.data.item_words import PACK_BINS, SIZE_BLOCKS, WORD_FIELDS
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import CRITIQUE, EOS, SPECIAL_TOKENS
from moe_rec.model.cache import KVCache
from moe_rec.model.config import MoERecConfig
from moe_rec.model.modeling import CACHE_FIELD, MoERecModel, MoERecOutput, MoERecPreTrainedModel, router_stats

TEXT_PRIOR_INIT = 5.0  # w at the start, a little below the best weight added to a trained model after
# training (beta 96-128 in summed-log-prob units on Beauty's validation split, 5.6-7.5 per code position)


def item_keys(codes: torch.Tensor, services: torch.Tensor) -> torch.Tensor:
    """One int64 key per item from its service token (...) and codes (..., P): a polynomial in a
    large odd base, wrapping on overflow (two catalogue items with one key are refused by
    :meth:`MoERecForItemPrediction.set_train_catalogue`)."""
    key = services.long()
    for p in range(codes.shape[-1]):
        key = key * 1_000_003 + codes[..., p].long()
    return key


def reference_word_bags(words: torch.Tensor, embedding: torch.Tensor, pad: int) -> torch.Tensor:
    """:meth:`MoERecForItemPrediction.word_bags` as a plain loop (for tests): (N, F, L) ids and a
    (V, D) embedding -> (N, F, D), each field the mean of its non-pad ids' rows (zero if none)."""
    out = torch.zeros(*words.shape[:-1], embedding.shape[1], dtype=embedding.dtype)
    for n in range(words.shape[0]):
        for f in range(words.shape[1]):
            ids = [int(i) for i in words[n, f] if int(i) != pad]
            if ids:
                out[n, f] = embedding[ids].mean(0)
    return out


def reference_copy_logits(words: torch.Tensor, gates: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """:meth:`MoERecForItemPrediction.copy_logits` as a plain loop (for tests): each row's explained
    item words (M, F, L) (ids outside [start, stop) are no subword) and field gates (M, F) -> (M, V + 1),
    every distinct subword of field f getting gate f once per field that holds it; column V (``[EOS]``)
    none."""
    out = torch.zeros(words.shape[0], stop - start + 1, dtype=torch.float64)
    for m in range(words.shape[0]):
        for f in range(words.shape[1]):
            for w in {int(i) for i in words[m, f] if start <= int(i) < stop}:
                out[m, w - start] += float(gates[m, f])
    return out


def reference_history_copy(
    history: list[torch.Tensor], gates: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """:meth:`MoERecForItemPrediction.history_copy_logits` of :meth:`~MoERecForItemPrediction.history_shares`
    as a plain loop (for tests): per position m its history items' words (H_m, F, L) (ids outside
    [start, stop) are no subword) and its field gates (M, F) -> (M, V + 1), every distinct subword of
    an item's field f getting gate f / H_m once per history item and field holding it."""
    out = torch.zeros(len(history), stop - start + 1, dtype=torch.float64)
    for m, words in enumerate(history):
        for item in words:
            for f in range(item.shape[0]):
                for w in {int(i) for i in item[f] if start <= int(i) < stop}:
                    out[m, w - start] += float(gates[m, f]) / len(words)
    return out


BIN_RELATIONS = ("below", "same", "above", "distance")  # an item's bin against the previous item's


def bin_relations(prev: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """(..., Q, 4) each of the Q = sum(blocks) bins against the previous item's bin ``prev`` (...) (-1:
    none, all zero). Bins form blocks (kinds of size: amounts, counts, words) that compare only
    within one: below it, the same, above it (0/1), and the signed distance (q - prev) / (len - 1), len
    the block's length; zero for a bin of another block."""
    block = torch.repeat_interleave(
        torch.arange(len(blocks), device=prev.device), torch.tensor(list(blocks), device=prev.device)
    )  # (Q,) each bin's block
    length = torch.tensor(list(blocks), device=prev.device, dtype=torch.float32)[block]
    q = torch.arange(len(block), device=prev.device)
    b = prev[..., None]
    same_block = (block == block[prev.clamp_min(0)][..., None]) & (b >= 0)  # (..., Q)
    rel = torch.stack([q < b, q == b, q > b], dim=-1) & same_block[..., None]
    distance = (q - b) / (length - 1).clamp_min(1) * same_block
    return torch.cat([rel.to(torch.float32), distance.to(torch.float32)[..., None]], dim=-1)


def reference_bin_query(
    tokens: list[int],
    is_word: list[bool],
    rows: list[int],
    services: list[int],
    query_services: list[int],
    bins: list[int],
    coef: torch.Tensor,
    blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """One ordinal field of :meth:`MoERecForItemPrediction.critique_ordinals` for one sequence as a
    plain loop (for tests).

    Args:
        tokens: (T,) unused beyond their count; is_word: (T,) whether a position is a critique word.
        rows: (T,) each position's catalogue row (-1: none); services: (T,) its first token;
        query_services: (T,) the service each position asks for; bins: (N,) each item's bin.
        coef: (T, Q + 4) the decoder's weights per position (absolute bins, then the relations).
        blocks: the bins' blocks (lengths summing to Q; default one block).

    Returns (T, Q): at a text position t, ``coef[t, q]`` plus, when an item of the asked service comes
    at or before t (the last one: the previous item) with a bin b in q's block, ``coef[t, Q]`` [q < b]
    + ``coef[t, Q+1]`` [q == b] + ``coef[t, Q+2]`` [q > b] + ``coef[t, Q+3]`` (q - b) / (len - 1)
    (len: the block's length, 1 counting as 2); zero elsewhere."""
    t_len, num_bins = len(tokens), coef.shape[1] - len(BIN_RELATIONS)
    blocks = list(blocks or [num_bins])
    block_of = [k for k, n in enumerate(blocks) for _ in range(n)]
    out = torch.zeros(t_len, num_bins, dtype=coef.dtype)
    for t in range(t_len):
        if not is_word[t]:
            continue
        prev = -1
        for s in range(t + 1):
            if rows[s] >= 0 and services[s] == query_services[t]:
                prev = rows[s]
        b = bins[prev] if prev >= 0 else -1
        for q in range(num_bins):
            out[t, q] = coef[t, q]
            if b >= 0 and block_of[q] == block_of[b]:
                length = max(blocks[block_of[q]] - 1, 1)
                out[t, q] += (
                    coef[t, num_bins] * (q < b) + coef[t, num_bins + 1] * (q == b)
                    + coef[t, num_bins + 2] * (q > b) + coef[t, num_bins + 3] * (q - b) / length
                )  # fmt: skip
    return out


PHRASE_FIELDS = (0, 1, 2)  # item_phrases: the fields of WORD_FIELDS matched as whole phrases (not the title)


def phrase_table(
    words: torch.Tensor, pad: int, terms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct phrases of the catalogue's words (N, F, L) in the fields :data:`PHRASE_FIELDS`,
    and with ``terms`` (N, K, L') each of an item's K terms as a phrase of one more field
    (``len(PHRASE_FIELDS)``): ids (U, max(L, L')) (``pad``-filled, left-aligned), field (U,) (index
    into PHRASE_FIELDS, then the terms' field), length (U,), and each item's membership (N, U) (1.0
    where the item's field is that phrase, or one of its terms). The same subwords in two fields
    are two phrases (each field has its own weight)."""
    n, _, width = words.shape
    sel = words[:, list(PHRASE_FIELDS)]  # (N, NP, L)
    if terms is not None:  # every term slot a field value of the terms' field
        width = max(width, terms.shape[2])
        sel = torch.cat([F.pad(sel, (0, width - sel.shape[2]), value=pad),
                         F.pad(terms, (0, width - terms.shape[2]), value=pad)], dim=1)  # fmt: skip
    slots = sel.shape[1]
    fields = torch.arange(slots, device=words.device).clamp_max(len(PHRASE_FIELDS))
    fields = fields[None, :, None].expand(n, -1, 1)
    keys = torch.cat([fields, sel], dim=-1).reshape(-1, width + 1)  # (N x NP, 1 + L)
    nonempty = (sel != pad).any(-1).reshape(-1)
    member = torch.zeros(n, 0, device=words.device)
    if not bool(nonempty.any()):
        empty = words.new_zeros(0)
        return words.new_full((0, width), pad), empty, empty, member
    unique, inverse = torch.unique(keys[nonempty], dim=0, return_inverse=True)
    ids = unique[:, 1:]
    lengths = (ids != pad).sum(-1)
    member = torch.zeros(n, len(unique), device=words.device)
    item = torch.arange(n, device=words.device)[:, None].expand(-1, slots).reshape(-1)
    member[item[nonempty], inverse] = 1.0
    return ids, unique[:, 0], lengths, member


def reference_phrase_query(
    tokens: list[int],
    is_word: list[bool],
    phrases: list[tuple[int, list[int]]],
    lin: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    named: torch.Tensor | None = None,
    held: list[set[int]] | None = None,
) -> torch.Tensor:
    """:meth:`MoERecForItemPrediction.critique_phrases` for one sequence as a plain loop (for tests).

    Args:
        tokens: (T,) each position's first token; is_word: (T,) whether it is a critique word.
        phrases: per phrase its field f and its subwords.
        lin: (T, NP) per position the field weights ``c_f(h_s)``; q, k: (T, NP, r) the bilinear parts.
        named: (T, NP) ``d_f(h_s)`` of ``critique_named_previous``, with ``held``: per position
            the phrases its previous item holds.

    Returns (T, U): at a critique word t, sum over the phrases matched in the run of critique words
    ending at t (the longest matches only: a match inside a longer match of any phrase is dropped)
    of ``c_f(h_s) + q_f(h_t) . k_f(h_s) / sqrt(r)`` (+ ``d_f(h_s)`` where t's previous item holds
    the phrase), s the match's last position; zero elsewhere.
    """
    t_len, r = len(tokens), max(q.shape[-1], 1)
    out = torch.zeros(t_len, len(phrases), dtype=lin.dtype)
    for t in range(t_len):
        if not is_word[t]:
            continue
        first = t
        while first > 0 and is_word[first - 1]:
            first -= 1
        run = tokens[first : t + 1]
        spans = []  # (start, end, phrase): every match inside the run
        for u, (_, ids) in enumerate(phrases):
            for a in range(len(run) - len(ids) + 1):
                if run[a : a + len(ids)] == ids:
                    spans.append((first + a, first + a + len(ids) - 1, u))
        for a, e, u in spans:
            inside = any(
                a2 <= a and e <= e2 and (a2, e2) != (a, e) for a2, e2, _ in spans
            )  # a strictly longer match covers it
            if inside:
                continue
            f = phrases[u][0]
            out[t, u] += lin[e, f] + (q[t, f] * k[e, f]).sum() / math.sqrt(r)
            if named is not None and u in held[t]:
                out[t, u] += named[e, f]
    return out


def same_codes(targets: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(M, N) True where target m's full ID (M, P) equals item n's (N, P): ``(targets[:, None] ==
    codes[None]).all(-1)`` without its (M, N, P) comparison, which took 14 % of a joint training
    step. Only the pairs that agree on the first code (about one in K) are compared on the rest."""
    first = targets[:, None, 0] == codes[None, :, 0]  # (M, N)
    m, n = first.nonzero(as_tuple=True)
    same = (targets[m, 1:] == codes[n, 1:]).all(-1)
    out = torch.zeros_like(first)
    out[m[same], n[same]] = True
    return out


def gather_scores_reference(by_code: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Scores (N, M) of N items for M queries: ``sum_p by_code[p, codes[:, p]]``.

    Args:
        by_code: (P, K, M) per-code scores, a code's scores for every query in one row (so each
            gather reads whole rows, in order: several times faster than gathering columns).
        codes: (N, P) the items' full IDs.
    """
    scores = torch.index_select(by_code[0], 0, codes[:, 0])  # (N, M)
    for p in range(1, codes.shape[1]):
        scores += torch.index_select(by_code[p], 0, codes[:, p])
    return scores


class _GatherScores(torch.autograd.Function):
    """:func:`gather_scores_reference` with a backward that adds each code position's rows of the
    gradient into one zero (P, K, M) tensor. Autograd of the loop zeroes the whole input once per
    code position (the backward of ``by_code[p]``): P full passes where one suffices."""

    @staticmethod
    def forward(ctx, by_code: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.by_code_shape = by_code.shape
        return gather_scores_reference(by_code, codes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (codes,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.by_code_shape)  # (P, K, M)
        for p in range(codes.shape[1]):
            out[p].index_add_(0, codes[:, p], grad)
        return out, None


def gather_scores(by_code: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """:func:`gather_scores_reference` (same arguments and result), with a cheaper backward when
    ``by_code`` needs a gradient (the training loss); parity: tests/model/test_item_model.py."""
    if by_code.requires_grad and torch.is_grad_enabled():
        return _GatherScores.apply(by_code, codes)
    return gather_scores_reference(by_code, codes)


class MoERecForItemPrediction(MoERecPreTrainedModel):
    """Decoder over event positions with parallel, embedding-tied semantic-ID heads."""

    def __init__(self, config: MoERecConfig) -> None:
        super().__init__(config)
        if not config.code_token_ranges:
            raise ValueError(
                "the item-level model needs config.code_token_ranges (one [start, stop) per code)"
            )
        self.model = MoERecModel(config)
        self._negatives_seed: int | None = None  # draw_negatives_from: None draws afresh each forward
        self.num_codes = len(config.code_token_ranges)  # P
        d = config.hidden_size
        self.code_proj = nn.Linear(d, self.num_codes * d, bias=False)  # W_p for every p, stacked
        self.service_proj: nn.Parameter | None = None
        if config.service_heads:  # Delta_p^s for every service slot s: service s's heads use W_p + Delta_p^s
            self.service_proj = nn.Parameter(torch.zeros(config.num_domains, self.num_codes * d, d))
        self.service_code_embed: nn.Parameter | None = None
        if config.service_codes:  # E^s for every service slot s: its code rows are E + E^s
            first, stop = config.code_token_ranges[0][0], max(r[1] for r in config.code_token_ranges)
            self.service_code_embed = nn.Parameter(torch.zeros(config.num_domains, stop - first, d))
        # item_loss='items': every item's codes (N, P) and service token (N,), set_train_catalogue
        self.register_buffer("train_codes", None, persistent=False)
        self.register_buffer("train_services", None, persistent=False)
        self.item_embed: nn.Embedding | None = None
        if config.item_embedding:  # a vector per catalogue item, found by its (service, codes) key
            self.item_embed = nn.Embedding(config.num_items, d)
            self.register_buffer("item_keys", torch.zeros(config.num_items, dtype=torch.long))  # sorted
            self.register_buffer("item_key_rows", torch.zeros(config.num_items, dtype=torch.long))
        self.text_proj: nn.Linear | None = None
        if config.item_text:  # frozen text embeddings (saved with the weights: a bundle needs them)
            self.register_buffer("item_text", torch.zeros(config.num_items, config.item_text_dim))
            self.text_proj = nn.Linear(config.item_text_dim, d, bias=False)
        self.service_text_proj: nn.Parameter | None = None
        if config.service_text:  # Delta^s: service s's items project their text with W + Delta^s
            self.service_text_proj = nn.Parameter(torch.zeros(config.num_domains, d, config.item_text_dim))
            # each catalogue row's service slot (saved with the weights, as the keys: serving needs it)
            self.register_buffer("item_service_slot", torch.zeros(config.num_items, dtype=torch.long))
        self.text_prior: nn.Parameter | None = None
        if config.item_text_prior:  # the weight of the last item's text similarity, in mean-code-logit units
            n = config.num_domains if config.item_text_prior_by_service else 1  # (1,): DeepSpeed takes no 0-d
            self.text_prior = nn.Parameter(torch.full((n,), TEXT_PRIOR_INIT))
        if config.item_words or config.narrative_copy:  # each item's subwords per field (saved with
            # the weights, as item_text): critiques are matched against them, narratives copy them
            shape = (config.num_items, len(WORD_FIELDS), config.item_word_slots)
            self.register_buffer("item_words", torch.full(shape, config.pad_token_id, dtype=torch.long))
        self.word_weight: nn.Linear | None = None
        if config.item_words:  # a_f(h_s) of every critique word, per field; zero at the start
            # (post_init), as a bias of 2.0 made words of unseen phrasings count (docs/critiques.md)
            self.word_weight = nn.Linear(d, len(WORD_FIELDS))
        # the phrase fields: brand, leaf category, band, and with item_terms the title terms
        self.phrase_fields = len(PHRASE_FIELDS) + int(bool(config.item_terms))
        terms = (
            None  # with item_terms: each item's distinctive title terms as subwords (saved with the weights)
        )
        if config.item_terms:
            terms = torch.full(
                (config.num_items, *config.item_term_shape), config.pad_token_id, dtype=torch.long
            )
        self.register_buffer("item_terms", terms)
        self.phrase_weight: nn.Linear | None = None
        if config.item_phrases:  # c_f(h_s) and the bilinear q_f(h_t) . k_f(h_s) of a matched phrase
            fields, r = self.phrase_fields, config.item_phrase_rank
            self.phrase_weight = nn.Linear(d, fields)
            self.phrase_q = nn.Linear(d, fields * r, bias=False)
            self.phrase_k = nn.Linear(d, fields * r, bias=False)
        self.named_previous_weight: nn.Linear | None = None
        if config.critique_named_previous:  # d_f(h_s): a matched phrase the previous item holds
            self.named_previous_weight = nn.Linear(d, self.phrase_fields)
        self.field_query: nn.Linear | None = None
        if config.critique_field_query:  # W_f h_t per field, zero at the start (post_init below)
            self.field_query = nn.Linear(d, len(WORD_FIELDS) * d, bias=False)
        self.previous_weight: nn.Linear | None = None
        if config.critique_previous:  # g_f(h_t): a field shared with the previous item, per phrase field
            self.previous_weight = nn.Linear(d, self.phrase_fields)
        self.price_weight: nn.Linear | None = None
        if config.item_price_bins:  # each item's price bin (saved with the weights); per critique word
            # Q absolute bin weights and 4 relative to the previous item's bin (below, same, above, distance)
            self.register_buffer("item_price_bin", torch.full((config.num_items,), -1, dtype=torch.long))
            self.price_weight = nn.Linear(d, config.item_price_bins + len(BIN_RELATIONS))
        self.size_weight: nn.Linear | None = None
        self.pack_weight: nn.Linear | None = None
        if config.item_amounts:  # each item's size bin and pack bin (saved with the weights); per
            # critique word the same kind of query as the price's, over the size grid and the pack bins
            self.register_buffer("item_size_bin", torch.full((config.num_items,), -1, dtype=torch.long))
            self.register_buffer("item_pack_bin", torch.zeros(config.num_items, dtype=torch.long))
            self.size_weight = nn.Linear(d, sum(SIZE_BLOCKS) + len(BIN_RELATIONS))
            self.pack_weight = nn.Linear(d, PACK_BINS + len(BIN_RELATIONS))
        self.copy_weight: nn.Linear | None = None
        if config.narrative_copy:  # c_f(h_t): how much a narrative position copies the item's field f
            self.copy_weight = nn.Linear(d, len(WORD_FIELDS))
        self.history_copy_weight: nn.Linear | None = None
        if config.narrative_history_copy:  # h_f(h_t): how much it copies the history's field f
            self.history_copy_weight = nn.Linear(d, len(WORD_FIELDS))
        self._phrase_cache: tuple | None = None  # (key, phrase_table(...)) of the current item words
        self._kept_vectors: torch.Tensor | None = None  # (N,) in a training forward: items keeping theirs
        self.post_init()
        if self.item_embed is not None:
            nn.init.zeros_(self.item_embed.weight)  # no item term until training gives it one
        if self.service_proj is not None:  # every service starts from the shared heads
            nn.init.zeros_(self.service_proj)
        if self.service_code_embed is not None:  # and from the shared code rows
            nn.init.zeros_(self.service_code_embed)
        if self.service_text_proj is not None:  # and from the shared text projection
            nn.init.zeros_(self.service_text_proj)
        if self.field_query is not None:
            nn.init.zeros_(self.field_query.weight)  # no field query until training gives it one
        for layer in (self.previous_weight, self.named_previous_weight):  # no such term until
            if layer is not None:  # training gives it one
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in self.ordinal_layers():  # no price, size or pack term until training gives it one
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.copy_weight, self.history_copy_weight):  # no copying until training asks
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def set_train_catalogue(
        self, codes: torch.Tensor, service_tokens: torch.Tensor, trained: torch.Tensor | None = None
    ) -> None:
        """The items the ``items`` loss normalises over: full IDs (N, P) and service tokens (N,),
        row i being the SID table's row i; ``trained`` (N,) False for items kept out of training
        (the cold-start benchmark: never a negative, so their per-item vector stays zero). The
        codes stay out of the saved weights; with ``item_embedding`` the (service, codes) keys of
        the rows are saved (serving finds an item's vector by them)."""
        device = self.model.embed_tokens.weight.device
        self.train_codes = codes.long().to(device)
        services = service_tokens.long().to(device)
        # the service each row is a candidate of; -1: no service's (kept out of training)
        self.train_services = services if trained is None else services.masked_fill(~trained.to(device), -1)
        self._rows_of: dict[int, torch.Tensor] = {}  # per service token, by _service_rows
        if self.item_embed is not None:
            if len(codes) != self.config.num_items:
                raise ValueError(f"{len(codes)} items for an item table of {self.config.num_items}")
            keys = item_keys(self.train_codes, services)
            order = torch.argsort(keys)
            if bool((keys[order][1:] == keys[order][:-1]).any()):
                raise ValueError("two catalogue items share a (service, codes) key; their IDs must differ")
            self.item_keys.copy_(keys[order])
            self.item_key_rows.copy_(order)
        if self.service_text_proj is not None:
            self.item_service_slot.copy_(self.service_slots(services))

    def _service_rows(self, service: int) -> torch.Tensor:
        """(N_s,) the rows of every trained item of service token ``service``, on the buffers'
        device: kept per service, made again once the model has moved (DeepSpeed moves it to the
        GPU after :meth:`set_train_catalogue`)."""
        rows = self._rows_of.get(service)
        if rows is None or rows.device != self.train_services.device:
            rows = self._rows_of[service] = (self.train_services == service).nonzero().flatten()
        return rows

    def item_rows(self, codes: torch.Tensor, services: torch.Tensor) -> torch.Tensor:
        """Catalogue rows (...) of items given by codes (..., P) and service tokens (...); -1 where
        no catalogue item has that key (a cold item, [BOS], padding)."""
        keys = item_keys(codes, services)
        pos = torch.searchsorted(self.item_keys, keys).clamp_max(len(self.item_keys) - 1)
        return torch.where(self.item_keys[pos] == keys, self.item_key_rows[pos], -1)

    def set_item_text(self, vectors: torch.Tensor) -> None:
        """The catalogue's text embeddings (N, item_text_dim), row i the SID table's row i."""
        if tuple(vectors.shape) != tuple(self.item_text.shape):
            raise ValueError(
                f"text embeddings of shape {tuple(vectors.shape)}; expected {tuple(self.item_text.shape)}"
            )
        self.item_text.copy_(vectors)

    def set_item_words(self, words: torch.Tensor) -> None:
        """The catalogue's words (N, F, L) (:func:`moe_rec.data.item_words.item_words`), row i the
        SID table's row i; every id a text token or ``[PAD]``."""
        self._check_text_table("item words", words, self.item_words.shape)
        self.item_words.copy_(words)

    def set_item_terms(self, terms: torch.Tensor) -> None:
        """The catalogue's distinctive title terms (N, K, L) (:func:`moe_rec.data.item_words.item_terms`),
        row i the SID table's row i; every id a text token or ``[PAD]``."""
        self._check_text_table("item terms", terms, self.item_terms.shape)
        self.item_terms.copy_(terms)

    def _check_text_table(self, name: str, table: torch.Tensor, shape: torch.Size) -> None:
        """ValueError unless ``table`` has ``shape`` and holds only text tokens and ``[PAD]``."""
        if tuple(table.shape) != tuple(shape):
            raise ValueError(f"{name} of shape {tuple(table.shape)}; expected {tuple(shape)}")
        start, stop = self.config.text_token_range
        pad = table == self.config.pad_token_id
        if not bool((pad | ((table >= start) & (table < stop))).all()):
            raise ValueError(f"{name} must be text tokens [{start}, {stop}) or [PAD]")

    def set_item_price_bins(self, bins: torch.Tensor) -> None:
        """The catalogue's price bins (N,) (:func:`moe_rec.data.item_words.item_price_bins`), row i the
        SID table's row i; -1 where an item has no price."""
        if tuple(bins.shape) != tuple(self.item_price_bin.shape):
            raise ValueError(
                f"price bins of shape {tuple(bins.shape)}; expected {tuple(self.item_price_bin.shape)}"
            )
        if not bool(((bins >= -1) & (bins < self.config.item_price_bins)).all()):
            raise ValueError(f"price bins must be -1 or in [0, {self.config.item_price_bins})")
        self.item_price_bin.copy_(bins)

    def set_item_amount_bins(self, bins: torch.Tensor) -> None:
        """The catalogue's size and pack bins (N, 2) (:func:`moe_rec.data.item_words.item_amount_bins`),
        row i the SID table's row i; a size bin is -1 where an item has no size."""
        if tuple(bins.shape) != (self.config.num_items, 2):
            raise ValueError(
                f"amount bins of shape {tuple(bins.shape)}; expected {(self.config.num_items, 2)}"
            )
        size, pack = bins[:, 0], bins[:, 1]
        if not bool(((size >= -1) & (size < sum(SIZE_BLOCKS))).all()):
            raise ValueError(f"size bins must be -1 or in [0, {sum(SIZE_BLOCKS)})")
        if not bool(((pack >= 0) & (pack < PACK_BINS)).all()):
            raise ValueError(f"pack bins must be in [0, {PACK_BINS})")
        self.item_size_bin.copy_(size)
        self.item_pack_bin.copy_(pack)

    def ordinal_layers(self) -> list[nn.Linear]:
        """The decoder's weights of each ordinal field the model reads (price, size, pack)."""
        return [f[1] for f in self.ordinal_fields()]

    def ordinal_fields(self) -> list[tuple[torch.Tensor, nn.Linear, tuple[int, ...]]]:
        """Per ordinal field the model reads (with ``item_price_bins`` the price, with ``item_amounts``
        the size and the pack): the catalogue's bins (N,), the decoder's weights (D -> Q + 4) and the
        bins' blocks (lengths summing to Q; bins compare within a block)."""
        out = []
        if self.price_weight is not None:
            out.append((self.item_price_bin, self.price_weight, (self.config.item_price_bins,)))
        if self.size_weight is not None and self.pack_weight is not None:
            out.append((self.item_size_bin, self.size_weight, SIZE_BLOCKS))
            out.append((self.item_pack_bin, self.pack_weight, (PACK_BINS,)))
        return out

    def critique_ordinals(
        self, item_tokens: torch.Tensor, hidden: torch.Tensor, query_services: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, Q) per text position the query over every ordinal field's bins (:meth:`ordinal_fields`,
        one after another): the decoder's absolute bin weights plus its weights of each bin's relation
        to the previous item's bin (:func:`bin_relations`; the previous item: the last catalogue item
        of the asked service ``query_services`` at or before t); zero where t is no text position. The
        decoder's weights are those at t, with ``ordinal_word_votes`` their sum over the critique's
        words s <= t. Dotted with an item's one-hot bins (:meth:`ordinal_one_hot`) it gives the item's price, size
        and pack term; :func:`reference_bin_query` is the plain version of one field."""
        _, word, index, last_break = self._text_runs(item_tokens)
        prev = self.previous_rows(item_tokens, query_services)  # (B, T)
        votes = self.config.ordinal_word_votes
        run = self._run_matrix(word, index, last_break).to(hidden.dtype) if votes else None  # (B, T, S)
        parts = []
        for bins, layer, blocks in self.ordinal_fields():
            num_bins = sum(blocks)
            prev_bin = torch.where(prev >= 0, bins[prev.clamp_min(0)], -1)  # (B, T)
            coef = layer(hidden)  # (B, T, Q + 4)
            if run is not None:  # each word of the critique votes: sum_s layer(h_s)
                coef = torch.einsum("bts,bsq->btq", run, coef)
            rel = bin_relations(prev_bin, blocks).to(coef.dtype)  # (B, T, Q, 4)
            parts.append(coef[..., :num_bins] + (rel * coef[..., None, num_bins:]).sum(-1))
        out = torch.cat(parts, dim=-1)
        return out * (word[..., None].to(out.dtype) * self.config.critique_relative_scale)

    def previous_rows(
        self, item_tokens: torch.Tensor, query_services: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) the catalogue row of the previous item at each position: the last catalogue item of
        the asked service ``query_services`` (B, T) at or before it; -1 where none. ``rows``: the
        positions' own rows (:meth:`position_rows`) when the caller has them."""
        rows = self.position_rows(item_tokens) if rows is None else rows  # (B, T)
        svc = item_tokens[..., 0]
        index = torch.arange(svc.shape[1], device=svc.device).expand_as(svc)
        cand = (index[:, None, :] <= index[:, :, None]) & (rows >= 0)[:, None, :]
        cand = cand & (svc[:, None, :] == query_services[:, :, None])  # (B, T, S)
        last = torch.where(cand, index[:, None, :], -1).amax(-1)  # (B, T) the previous item's position
        return torch.where(last >= 0, rows.gather(1, last.clamp_min(0)), -1)

    def critique_previous(
        self, item_tokens: torch.Tensor, hidden: torch.Tensor, query_services: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, U) with ``critique_previous``: per text position t and catalogue phrase, ``g_f(h_t)``
        where the previous item (:meth:`previous_rows`) holds the phrase (f its field: "the same brand /
        category / band as the item before"); zero elsewhere. Added to :meth:`critique_phrases`, so an
        item gets ``g_f(h_t)`` for each field it shares with the previous item."""
        member, field = self.phrases()[3], self.phrases()[1]
        word = self._text_runs(item_tokens)[1]
        prev = self.previous_rows(item_tokens, query_services)  # (B, T)
        held = member[prev.clamp_min(0)] * (prev >= 0)[..., None]  # (B, T, U)
        g = self.previous_weight(hidden) * self.config.critique_relative_scale  # (B, T, NP)
        return held.to(g.dtype) * g[..., field] * word[..., None].to(g.dtype)

    def ordinal_one_hot(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., Q) the one-hot bin of catalogue ``rows`` in each ordinal field (:meth:`ordinal_fields`),
        one after another; a field's part is zero where the item has no bin (-1) or a row is -1."""
        parts = []
        for bins, _, blocks in self.ordinal_fields():
            b = torch.where(rows >= 0, bins[rows.clamp_min(0)], -1)
            parts.append(F.one_hot(b.clamp_min(0), sum(blocks)).float() * (b >= 0)[..., None])
        return torch.cat(parts, dim=-1)

    def word_bags(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., F, D) per field the mean input embedding of the subwords of catalogue ``rows``;
        zero for an empty field and where a row is -1. One ``embedding_bag`` (no (..., F, L, D)
        intermediate); :func:`reference_word_bags` is the plain version it is tested against."""
        words = self.item_words[rows.clamp_min(0)]  # (..., F, L)
        emb = self.model.embed_tokens.weight
        bags = F.embedding_bag(
            words.reshape(-1, words.shape[-1]), emb, mode="mean", padding_idx=self.config.pad_token_id
        )  # (... x F, D)
        bags = bags.view(*words.shape[:-1], emb.shape[1])
        return bags * (rows >= 0)[..., None, None].to(bags.dtype)

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D) the per-item vectors of catalogue ``rows``: the learned vector, plus with
        ``item_text`` the projection of the item's text embedding; zero where a row is -1."""
        safe = rows.clamp_min(0)
        vec = self.item_embed(safe)
        if (
            self.training and self._kept_vectors is not None
        ):  # item_vector_dropout: these items' learned vectors left out
            vec = vec * self._kept_vectors[safe][..., None].to(vec.dtype)
        if self.text_proj is not None:
            text = self.item_text[safe].to(vec.dtype)
            vec = vec + self.text_proj(text)
            if self.service_text_proj is not None:  # every service's change, then each row's own
                every = torch.einsum("...e,sde->...sd", text, self.service_text_proj.to(vec.dtype))
                own = self.item_service_slot[safe][..., None, None].expand(*safe.shape, 1, vec.shape[-1])
                vec = vec + every.gather(-2, own).squeeze(-2)
        return vec * (rows >= 0)[..., None].to(vec.dtype)

    def score_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D') what an item's per-item term dots with the query (:meth:`item_query`): its
        vector, with ``item_text_prior`` its unit text embedding, with ``item_words`` its F unit
        field vectors (:meth:`word_bags`, normalised; zero for an empty field); zero where a row is -1."""
        parts = [self.item_vectors(rows)]
        if self.text_prior is not None:
            parts.append(self._unit_text(rows).to(parts[0].dtype))
        if self.word_weight is not None:
            bags = F.normalize(self.word_bags(rows), dim=-1)  # (..., F, D)
            parts.append(bags.flatten(-2).to(parts[0].dtype))
        if self.phrase_weight is not None:  # each item's phrases (brand, category, band): one-hot
            member = self.phrases()[3][rows.clamp_min(0)] * (rows >= 0)[..., None]
            parts.append(member.to(parts[0].dtype))
        if self.ordinal_fields():  # its price (size, pack) bins, one-hot
            parts.append(self.ordinal_one_hot(rows).to(parts[0].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def phrases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`phrase_table` of the current item words (and terms), computed once per change of
        the buffers (loading weights, :meth:`set_item_words` or :meth:`set_item_terms` bumps a
        version; moving one changes its storage)."""
        key = tuple(
            (b._version, b.data_ptr(), str(b.device))
            for b in (self.item_words, self.item_terms)
            if b is not None
        )
        if self._phrase_cache is None or self._phrase_cache[0] != key:
            self._phrase_cache = (
                key,
                phrase_table(self.item_words, self.config.pad_token_id, self.item_terms),
            )
        return self._phrase_cache[1]

    def critique_phrases(
        self, item_tokens: torch.Tensor, hidden: torch.Tensor, query_services: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, U) per position and catalogue phrase (:meth:`phrases`) the weight the critique
        ending there gives the phrase: over its matches in the run of critique words s <= t (the whole
        phrase, contiguous, inside the run; a match inside a longer match dropped), ``c_f(h_s) +
        q_f(h_t) . k_f(h_s) / sqrt(r)`` with s the match's last position and f the phrase's field,
        with ``critique_named_previous`` plus ``d_f(h_s)`` where the previous item (of the asked
        service ``query_services`` (B, T), :meth:`previous_rows`) holds the phrase; zero where t is
        no critique word. Dotted with an item's phrase membership it gives the item's
        ``item_phrases`` term; :func:`reference_phrase_query` is the plain version."""
        ids, field, lengths, _ = self.phrases()
        b, t_len = item_tokens.shape[:2]
        first, word, index, last_break = self._text_runs(item_tokens)
        u, width = ids.shape
        k = torch.arange(width, device=ids.device)
        src = index[0][:, None] - k  # (T, L) position s - k
        back = first[:, src.clamp_min(0)]  # (B, T, L) the token k before s
        inside = (src[None] >= 0) & (src[None] > last_break[:, :, None])  # (B, T, L) in s's run
        need = k[None] < lengths[:, None]  # (U, L)
        rev = ids.gather(1, (lengths[:, None] - 1 - k).clamp_min(0))  # (U, L) the phrase backwards
        pos = word.nonzero(as_tuple=True)  # the text positions only
        back, inside = back[pos], inside[pos]  # (n, L)
        # (text position, phrase) pairs whose last subword is there, then the rest of each pair checked:
        # a few per position, not (n, U, L) comparisons (U is a few thousand on Amazon Beauty)
        at, ph = ((back[:, :1] == rev[None, :, 0]) & inside[:, :1]).nonzero(as_tuple=True)
        hit = ((back[at] == rev[ph]) & inside[at] | ~need[ph]).all(-1)  # phrase ph ends at position at
        at, ph = at[hit], ph[hit]
        # the longest matches only: a match inside a longer one ending at the same position is dropped;
        # one inside a longer match ending later is dropped from that position on (causal: the critique
        # ending at t has read only up to t)
        longest_at = lengths.new_zeros(len(back)).scatter_reduce(0, at, lengths[ph], "amax")  # (n,)
        keep = lengths[ph] >= longest_at[at]
        match = torch.zeros(b, t_len, u, dtype=torch.bool, device=ids.device)
        match[pos[0][at[keep]], pos[1][at[keep]], ph[keep]] = True
        longest = torch.zeros_like(first)  # (B, T)
        longest[pos] = longest_at.to(longest.dtype)
        big = t_len + width + 1
        start = torch.where(longest > 0, index - longest + 1, big)  # (B, T) start of the longest match
        later = index[:, None, :] > index[:, :, None]  # (B, S, S'): s' after s
        run = self._run_matrix(word, index, last_break)  # (B, T, S)
        r = max(self.config.item_phrase_rank, 1)
        nf = self.phrase_fields
        weight = self.phrase_weight(hidden)[:, None].expand(-1, t_len, -1, -1)  # (B, T, S, NP) c_f(h_s)
        if self.config.item_phrase_rank:
            q = self.phrase_q(hidden).view(b, t_len, nf, r)
            kk = self.phrase_k(hidden).view(b, t_len, nf, r)
            weight = weight + torch.einsum("btfr,bsfr->btsf", q, kk) / math.sqrt(r)
        weight = weight * run[..., None].to(weight.dtype)
        named = self.named_previous_weight is not None
        if named:  # (B, T, S, NP, 2): the weight of any match, and the more of one the previous item holds
            extra = self.named_previous_weight(hidden)[:, None].expand(-1, t_len, -1, -1)
            weight = torch.stack([weight, extra * run[..., None].to(extra.dtype)], dim=-1)
        parts, order = [], []  # per (length, field) its columns' weights, assembled once below
        for length in lengths.unique().tolist():
            own = index - length + 1  # (B, S) where a match of this length ending at s starts
            covers = later & (start[:, None, :] <= own[..., None])  # (B, S, S'): s' covers it
            cover_at = torch.where(covers, index[:, None, :], big).amin(-1)  # (B, S) first s' covering it
            alive = index[:, :, None] < cover_at[:, None, :]  # (B, T, S): not covered by t
            for f in range(nf):
                cols = ((field == f) & (lengths == length)).nonzero().flatten()
                if len(cols):
                    w_f = weight[:, :, :, f] * (alive[..., None] if named else alive)
                    parts.append(torch.einsum("bts...,bsu->btu...", w_f, match[..., cols].to(weight.dtype)))
                    order.append(cols)
        if not parts:
            return hidden.new_zeros(b, t_len, u)
        # one gather back to phrase order: an in-place write per group made the backward copy (B, T, U) each time
        out = torch.cat(parts, dim=2)[:, :, torch.argsort(torch.cat(order))]
        if not named:
            return out
        if query_services is None:
            raise ValueError("critique_named_previous: critique_phrases needs the asked services")
        prev = self.previous_rows(item_tokens, query_services)  # (B, T)
        held = self.phrases()[3][prev.clamp_min(0)] * (prev >= 0)[..., None]  # (B, T, U)
        return out[..., 0] + held.to(out.dtype) * out[..., 1]

    def _text_runs(self, item_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T) each position's first token, whether it is a critique word, its index, and the last
        position <= t that is no critique word. A critique word is a text position in a run of them
        right after ``[CRITIQUE]``: a narrative's words (after ``[EXPLAIN]``) are text positions but
        no critique, and no item is ranked inside a narrative, so the critique terms skip them."""
        start, stop = self.config.text_token_range
        first = item_tokens[..., 0]  # (B, T): a text position holds one token
        text = (first >= start) & (first < stop)
        index = torch.arange(first.shape[1], device=first.device).expand_as(first)
        text_break = torch.where(text, -1, index).cummax(dim=1).values  # the last non-text position <= t
        opener = first.gather(1, text_break.clamp_min(0))  # the token that opened t's run of text
        word = text & (text_break >= 0) & (opener == CRITIQUE)
        last_break = torch.where(word, -1, index).cummax(dim=1).values
        return first, word, index, last_break

    @staticmethod
    def _run_matrix(word: torch.Tensor, index: torch.Tensor, last_break: torch.Tensor) -> torch.Tensor:
        """(B, T, S): s is a word of the critique (run of its words) ending at t."""
        run = (index[:, None, :] > last_break[:, :, None]) & (index[:, None, :] <= index[:, :, None])
        return run & word[:, :, None]

    def critique_words(self, item_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, F x D) per position and field ``sum_s a_f(h_s) e_s`` over the critique that ends
        there: the run of critique words s <= t (zero where t is no critique word), ``e_s``
        the unit input embedding of s's token, ``a_f`` :attr:`word_weight` of the decoder output
        ``hidden`` (B, T, D) at s. Dotted with an item's unit field vectors it gives the item's
        ``item_words`` term (:meth:`score_vectors`)."""
        first, word, index, last_break = self._text_runs(item_tokens)
        run = self._run_matrix(word, index, last_break)  # (B, T, S): s is a word of the critique ending at t
        e = F.normalize(self.model.embed_tokens(first), dim=-1) * word[..., None]  # (B, S, D)
        a = self.word_weight(hidden)  # (B, S, F)
        out = torch.einsum("bts,bsf,bsd->btfd", run.to(a.dtype), a, e.to(a.dtype))
        if self.field_query is not None:  # + W_f h_t at every critique word t (zero elsewhere)
            b, t_len, nf, d = out.shape
            out = out + self.field_query(hidden).view(b, t_len, nf, d) * word[..., None, None].to(out.dtype)
        return out.flatten(-2)

    def _unit_text(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D_text) the unit text embeddings of catalogue ``rows``; zero where a row is -1."""
        text = F.normalize(self.item_text[rows.clamp_min(0)].float(), dim=-1)
        return text * (rows >= 0)[..., None].to(text.dtype)

    def item_query(
        self,
        query: torch.Tensor,
        query_services: torch.Tensor,
        own_rows: torch.Tensor | None,
        words: torch.Tensor | None = None,
        phrases: torch.Tensor | None = None,
        ordinals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(..., D') the query of the per-item term: the heads' query (..., D); with
        ``item_text_prior`` the weighted unit text embedding of the item the prior reads at each
        position (``own_rows``, :meth:`prior_rows`, -1: none), so that ``item_query . score_vectors``
        adds ``w x cos(that item, candidate)`` (with ``item_text_prior_by_service`` ``w`` of the asked service,
        ``query_services`` (...)); with ``item_words`` the critique's weighted words (:meth:`critique_words`,
        (..., F x D)) that meet the candidate's field vectors; with ``item_phrases`` its phrase weights
        (..., U); with ``item_price_bins`` / ``item_amounts`` its query over the price, size and pack
        bins (:meth:`critique_ordinals`, (..., Q))."""
        parts = [query]
        if self.text_prior is not None:
            w = self.text_prior
            if self.config.item_text_prior_by_service:
                w = self.text_prior[self.service_slots(query_services)][..., None]  # (..., 1)
            parts.append(w * self._unit_text(own_rows).to(query.dtype))
        if self.word_weight is not None:
            parts.append(words.to(query.dtype))
        if self.phrase_weight is not None:
            parts.append(phrases.to(query.dtype))
        if self.ordinal_fields():
            parts.append(ordinals.to(query.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def plain_query_width(self) -> int:
        """Width of the leading part of :meth:`item_query` that a position without a critique fills
        (the heads' query, with ``item_text_prior`` the text part); the critique parts after it
        (item words, phrases, price / size / pack bins) are zero there."""
        return self.config.hidden_size + (self.config.item_text_dim if self.text_prior is not None else 0)

    def query_scores(self, query: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """(M, C) ``query @ vectors.T`` for queries (M, D') and score vectors (C, D'), the critique
        parts (past :meth:`plain_query_width`) multiplied only for the rows where they are non-zero:
        few positions read a critique, and with ``item_phrases`` those parts are the widest (a column
        per catalogue phrase, a few thousand on Amazon Beauty). The same sum, skipping exact zeros."""
        w = self.plain_query_width()
        if query.shape[-1] <= w:
            return query @ vectors.T
        scores = query[:, :w] @ vectors[:, :w].T
        read = (query[:, w:] != 0).any(-1).nonzero().flatten()
        if len(read):
            scores = scores.index_add(0, read, query[read, w:] @ vectors[:, w:].T)
        return scores

    def own_item_term(self, query: torch.Tensor, own_rows: torch.Tensor) -> torch.Tensor:
        """(...) what the item the prior reads at each position (``own_rows``, :meth:`prior_rows`)
        must lose so that its own text prior is 0: its cosine with itself is 1, so it got ``w``,
        which the text part of the query (:meth:`item_query`) dotted with its unit text gives back
        (read from the query, not the weight: outside a forward pass ZeRO-3 may hold no copy of it)."""
        d = self.config.hidden_size
        text = query[..., d : d + self.config.item_text_dim].float()  # the text prior's part
        return -(text * self._unit_text(own_rows)).sum(-1)

    @torch.no_grad()
    def item_table(self) -> torch.Tensor | None:
        """(N, D') every catalogue item's :meth:`score_vectors` in SID-table row order (None without
        ``item_embedding``). Computed on each call: callers that rank many batches with fixed
        weights (evaluation, serving) compute it once."""
        if self.item_embed is None:
            return None
        return self.score_vectors(torch.arange(self.config.num_items, device=self.item_embed.weight.device))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def code_layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, K_max) embedding row of each code, and (P, K_max) False past a shorter code range.
        Built from the config on each call (a few hundred integers), not stored: nothing to load."""
        ranges = self.config.code_token_ranges
        width = max(stop - start for start, stop in ranges)  # K_max
        offsets = torch.arange(width, device=device)  # (K_max,)
        starts = torch.tensor([r[0] for r in ranges], device=device)[:, None]  # (P, 1)
        sizes = torch.tensor([r[1] - r[0] for r in ranges], device=device)[:, None]
        valid = offsets < sizes  # (P, K_max)
        return torch.where(valid, starts + offsets, starts), valid

    def service_code_rows(self, slot: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) the change ``E^s`` of code ``tokens`` (ids) for service slots ``slot`` (same
        shape), zero where a token is not a code (with ``service_codes``)."""
        first = self.config.code_token_ranges[0][0]
        n = self.service_code_embed.shape[1]
        index = tokens - first
        code = (index >= 0) & (index < n)
        return self.service_code_embed[slot, index.clamp(0, n - 1)] * code[..., None].to(
            self.service_code_embed.dtype
        )

    def embed_positions(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, S) bags of tokens -> (B, T, D): mean of the non-pad tokens' embeddings x sqrt(D);
        with ``service_codes`` an event's codes are its service's rows."""
        emb = self.model.embed_tokens(item_tokens)  # (B, T, S, D); [PAD] rows are zero
        count = (item_tokens != self.config.pad_token_id).sum(-1, keepdim=True).clamp_min(1)  # (B, T, 1)
        x = emb.sum(2)
        if self.service_code_embed is not None:  # a text position's first token is no service: no code
            slot = self.service_slots(item_tokens[..., :1]).expand_as(item_tokens[..., 1:])
            x = x + self.service_code_rows(slot, item_tokens[..., 1:]).to(x.dtype).sum(2)
        x = x / count.to(emb.dtype)
        if self.item_embed is not None:  # + the item's own vector where it is a catalogue item
            rows = self.position_rows(item_tokens)  # (B, T)
            x = x + self.item_vectors(rows)
            if self.config.item_words_input:  # + the mean of its field vectors
                x = x + self.word_bags(rows).mean(-2).to(x.dtype)
        return x * math.sqrt(self.config.hidden_size)

    def position_rows(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) catalogue row of each position's item (-1: not an item, or not in the catalogue)."""
        rows, _ = self.code_layout(item_tokens.device)
        codes = (item_tokens[..., 1:] - rows[:, 0]).clamp_min(0)  # (B, T, P) code indices
        first = item_tokens[..., 0]
        return torch.where(self.is_service(first), self.item_rows(codes, first), -1)

    def is_service(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) whether each token is a service token (an event's first token, or an asked service)."""
        first_code = self.code_layout(tokens.device)[0][0, 0]
        return (tokens >= len(SPECIAL_TOKENS)) & (tokens < first_code)

    def prior_rows(self, item_tokens: torch.Tensor, query_services: torch.Tensor) -> torch.Tensor:
        """(B, T) the catalogue row whose text the text prior compares each candidate with: at a
        position holding a catalogue item that asks for a service (``query_services`` (B, T)), the
        last item of that service at or before it (the position's own item when it is of that
        service; -1 when the history holds none); the position's own item where it asks for none
        (text follows), -1 where it holds none. With ``item_text_prior_same_service`` off, the
        position's own item whatever its service."""
        rows = self.position_rows(item_tokens)
        if not self.config.item_text_prior_same_service:
            return rows
        same = self.previous_rows(item_tokens, query_services, rows)
        return torch.where((rows >= 0) & self.is_service(query_services), same, rows)

    @staticmethod
    def asked_services(item_tokens: torch.Tensor, query_services: torch.Tensor | None) -> torch.Tensor:
        """(B, T) the service token each position asks for: ``query_services`` when given, else the
        next position's service token (the last position repeats its own)."""
        if query_services is not None:
            return query_services
        service = item_tokens[..., 0]
        return torch.cat([service[:, 1:], service[:, -1:]], dim=1)

    def query(self, hidden: torch.Tensor, query_services: torch.Tensor) -> torch.Tensor:
        """(B, T, D) what the heads read: the decoder output plus the asked service's embedding."""
        return hidden + self.model.embed_tokens(query_services)

    def service_slots(self, query_services: torch.Tensor) -> torch.Tensor:
        """(...) each asked service token's slot: its id past the special tokens, in [0, num_domains)."""
        return (query_services - len(SPECIAL_TOKENS)).clamp(0, self.config.num_domains - 1)

    def head_projection(self, query: torch.Tensor, query_services: torch.Tensor) -> torch.Tensor:
        """(B, T, P x D) ``W_p q`` for every code position p, stacked; with ``service_heads`` plus
        ``Delta_p^s q``, s the asked service (its slot: the service token minus the special tokens).
        One matrix product per asked service, so the cost is one projection whatever the services."""
        out = self.code_proj(query)
        if self.service_proj is None:
            return out
        slot = self.service_slots(query_services)  # (B, T)
        delta = torch.zeros_like(out)
        for s in slot.unique().tolist():
            at = slot == s
            delta[at] = query[at] @ self.service_proj[s].T
        return out + delta

    def code_queries(self, hidden: torch.Tensor, query_services: torch.Tensor) -> torch.Tensor:
        """(B, T, P, D) each code position's unit query: the heads' projection of :meth:`query`."""
        b, t, d = hidden.shape
        query = self.query(hidden, query_services)  # (B, T, D)
        return F.normalize(self.head_projection(query, query_services).view(b, t, self.num_codes, d), dim=-1)

    def code_keys(self, slot: int | None = None) -> torch.Tensor:
        """(P, K_max, D) the unit code embeddings the heads compare with; with ``service_codes`` those
        of service slot ``slot`` (its own change added). Rows past a short code range repeat its
        first code (:meth:`code_layout`)."""
        rows, _ = self.code_layout(self.model.embed_tokens.weight.device)
        keys = self.model.embed_tokens(rows)  # (P, K_max, D)
        if slot is not None and self.service_code_embed is not None:
            keys = keys + self.service_code_rows(torch.full_like(rows, slot), rows).to(keys.dtype)
        return F.normalize(keys, dim=-1)

    def code_logits(self, hidden: torch.Tensor, query_services: torch.Tensor) -> torch.Tensor:
        """Logits of every code position for the next item.

        Args:
            hidden: (B, T, D) decoder outputs.
            query_services: (B, T) token id of the service each position's next item belongs to.

        Returns:
            (B, T, P, K_max) cosine logits / temperature; ``-inf`` past a code position's range.
        """
        q = self.code_queries(hidden, query_services)  # (B, T, P, D)
        _, valid = self.code_layout(hidden.device)
        if self.service_code_embed is None:
            logits = torch.einsum("btpd,pkd->btpk", q, self.code_keys())
        else:  # each asked service's own code rows: one product per service, as head_projection
            slot = self.service_slots(query_services)  # (B, T)
            logits = q.new_zeros(*q.shape[:3], valid.shape[1])
            for s in slot.unique().tolist():
                at = slot == s
                logits[at] = torch.einsum("npd,pkd->npk", q[at], self.code_keys(s))
        return (logits / self.config.item_head_temperature).masked_fill(~valid, float("-inf"))

    def text_logits(
        self,
        hidden: torch.Tensor,
        rows: torch.Tensor | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(M, V + 1) the next text token's logits from decoder outputs (M, D): a dot product
        with the input embeddings of the V subwords, then of ``[EOS]`` (class V), as Gemma ties
        its output to its input; with ``narrative_copy`` plus :meth:`copy_logits` of the explained
        items' ``rows`` (M,); with ``narrative_history_copy`` plus :meth:`history_copy_logits` of
        ``history``, the (bags, bag of each position) of :meth:`history_shares`."""
        start, stop = self.config.text_token_range
        emb = self.model.embed_tokens.weight
        logits = F.linear(hidden, torch.cat([emb[start:stop], emb[EOS : EOS + 1]]))
        if self.copy_weight is None:
            return logits
        if rows is None:
            raise ValueError("narrative_copy: text_logits needs the explained items' rows")
        logits = logits + self.copy_logits(hidden, rows).to(logits.dtype)
        if self.history_copy_weight is None:
            return logits
        if history is None:
            raise ValueError("narrative_history_copy: text_logits needs the history's shares")
        return logits + self.history_copy_logits(hidden, *history).to(logits.dtype)

    def explained_rows(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) the catalogue row of the last item at or before each position: the item a narrative
        written there is about (the emitted item precedes ``[EXPLAIN]``); -1 where none."""
        rows = self.position_rows(item_tokens)  # (B, T)
        last = self._last_item(rows)
        return torch.where(last >= 0, rows.gather(1, last.clamp_min(0)), -1)

    @staticmethod
    def _last_item(rows: torch.Tensor) -> torch.Tensor:
        """(B, T) the position of the last catalogue item at or before each position (``rows`` (B, T),
        :meth:`position_rows`); -1 where none."""
        index = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
        return torch.where(rows >= 0, index, -1).cummax(dim=1).values

    def _distinct_words(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The words of catalogue ``rows`` (...), each field sorted, (..., F, L), and where each holds
        a subword for the first time in its field (..., F, L) (not ``[PAD]``, not where a row is -1)."""
        start, stop = self.config.text_token_range
        words = self.item_words[rows.clamp_min(0)].sort(dim=-1).values
        repeat = torch.zeros_like(words, dtype=torch.bool)
        repeat[..., 1:] = words[..., 1:] == words[..., :-1]
        return words, (words >= start) & (words < stop) & ~repeat & (rows >= 0)[..., None, None]

    def copy_logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(M, V + 1) with ``narrative_copy``: for each of M text positions (``hidden`` (M, D)) and its
        explained item (``rows`` (M,), -1: none), ``c_f(h)`` added once to every distinct subword of
        the item's field f, summed over the fields that hold it; zero for ``[EOS]`` and where a row is
        -1. :func:`reference_copy_logits` is the plain version it is tested against."""
        start, stop = self.config.text_token_range
        words, keep = self._distinct_words(rows)  # (M, F, L)
        cols = torch.where(keep, words - start, stop - start + 1)  # column V + 1 takes the rest
        gates = self.copy_weight(hidden)  # (M, F)
        out = gates.new_zeros(len(rows), stop - start + 2)
        out.scatter_add_(1, cols.flatten(1), gates[..., None].expand(words.shape).flatten(1))
        return out[:, : stop - start + 1]

    def history_shares(
        self, item_tokens: torch.Tensor, b: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For M positions (``b``, ``t``) of ``item_tokens`` (B, T, P): per distinct history, the share
        of its items whose field f holds each subword, (G, F, V + 1) (column V, ``[EOS]``, zero), and
        each position's history (M,) (an index into the G). A position's history is the catalogue
        items of the explained item's service (:meth:`explained_rows`: the last item at or before
        t) before that item, as the narratives' taste line reads it; none where no item precedes t.
        :func:`reference_history_copy` is the plain version of both."""
        start, stop = self.config.text_token_range
        v = stop - start
        rows = self.position_rows(item_tokens)  # (B, T)
        t_len = rows.shape[1]
        index = torch.arange(t_len, device=rows.device)
        explained = self._last_item(rows)[b, t]  # (M,) -1: none
        keys, group = torch.unique(b * (t_len + 1) + explained + 1, return_inverse=True)
        gb, ge = keys // (t_len + 1), keys % (t_len + 1) - 1  # (G,) its sequence, explained position
        svc = item_tokens[..., 0]
        own = svc[gb, ge.clamp_min(0)]  # (G,) the explained item's service
        held = (index < ge[:, None]) & (rows[gb] >= 0) & (svc[gb] == own[:, None])  # (G, T)
        share = held / held.sum(1, keepdim=True).clamp_min(1)  # (G, T)
        words, keep = self._distinct_words(torch.where(held, rows[gb], -1))  # (G, T, F, L)
        cols = torch.where(keep, words - start, v + 1).transpose(1, 2).flatten(2)  # (G, F, T x L)
        values = (share[..., None, None] * keep).transpose(1, 2).flatten(2)
        bags = share.new_zeros(len(keys), words.shape[2], v + 2).scatter_add_(2, cols, values)
        return bags[..., : v + 1], group

    def history_copy_logits(
        self, hidden: torch.Tensor, bags: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """(M, V + 1) with ``narrative_history_copy``: for each of M text positions (``hidden``
        (M, D)), ``sum_f h_f(h) x bags[group, f]``: each subword gets the gate of field f times the
        share of the position's history items holding it there (:meth:`history_shares`)."""
        gates = self.history_copy_weight(hidden)  # (M, F)
        out = gates.new_zeros(len(group), bags.shape[-1])
        for f in range(bags.shape[1]):  # a field at a time: no (M, F, V + 1) intermediate
            out = out + gates[:, f, None] * bags[group, f].to(gates.dtype)
        return out

    @torch.no_grad()
    def next_text_logits(
        self,
        item_tokens: torch.LongTensor,
        domain_ids: torch.LongTensor,
        user_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        explained_rows: torch.LongTensor | None = None,
        history_bags: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, V + 1) the text head's logits after the last position of left-padded prompts
        (:meth:`text_logits`): what a narrative writes next.

        With ``past_key_values`` (a :class:`~moe_rec.model.cache.MoERecCache`, empty for the
        prefill) ``item_tokens`` / ``domain_ids`` are only the positions after the cached ones,
        ``attention_mask`` covers the cached positions and the new ones (B, S), and the cache is
        updated in place (keys, values and the router's running profile). ``explained_rows`` (B,):
        with ``narrative_copy``, the items the narratives are about (:meth:`explained_rows` of the
        prompts); needed once the cache holds them, read from ``item_tokens`` otherwise; likewise
        ``history_bags`` (B, F, V + 1) with ``narrative_history_copy`` (:meth:`prompt_history`)."""
        if self.config.text_token_range is None:
            raise ValueError("this model has no text head (trained without critiques and narratives)")
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if self.copy_weight is not None and explained_rows is None:
            if not prefill:
                raise ValueError("narrative_copy: after the prefill, pass the explained items' rows")
            explained_rows = self.explained_rows(item_tokens)[:, -1]
        if self.history_copy_weight is not None and history_bags is None:
            if not prefill:
                raise ValueError("narrative_history_copy: after the prefill, pass the history's bags")
            history_bags = self.prompt_history(item_tokens)
        hidden, _, _ = self.model(
            None, domain_ids, user_ids=user_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, inputs_embeds=self.embed_positions(item_tokens),
        )  # fmt: skip
        history = None
        if history_bags is not None:  # one history per prompt
            history = (history_bags, torch.arange(len(history_bags), device=hidden.device))
        return self.text_logits(hidden[:, -1], explained_rows, history)

    def prompt_history(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """(B, F, V + 1) the history shares (:meth:`history_shares`) at the last position of each of
        the left-padded prompts ``item_tokens`` (B, T, P): what their narratives' taste line copies."""
        b = torch.arange(item_tokens.shape[0], device=item_tokens.device)
        bags, group = self.history_shares(item_tokens, b, torch.full_like(b, item_tokens.shape[1] - 1))
        return bags[group]

    def forward(
        self,
        item_tokens: torch.LongTensor,
        domain_ids: torch.LongTensor,
        user_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        query_services: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        text_labels: torch.LongTensor | None = None,
        teacher_rows: torch.LongTensor | None = None,
        teacher_log_probs: torch.Tensor | None = None,
        **kwargs,
    ) -> MoERecOutput:
        """Args:
        item_tokens: (B, T, S) each position's tokens (``[PAD]``-filled).
        domain_ids: (B, T) service index of each position (the router reads it).
        user_ids: (B,) hashed user buckets (``router_mode='domain_user'``).
        attention_mask: (B, T) 1 for real positions, 0 for padding (left or right).
        labels: (B, T, P) code indices of each position's own event, -100 where none; position t
            is trained to predict the codes of position t + 1.
        query_services: (B, T) service token asked after each position; default: the next
            position's service token (the last position repeats its own).
        logits_to_keep: code logits for only the last this-many positions (0 = all).
        text_labels: (B, T) with ``text_token_range``: each narrative position's own text class
            (:func:`moe_rec.data.positions.text_labels`), -100 elsewhere; position t is trained
            to write the text of position t + 1.
        teacher_rows, teacher_log_probs: (B, T, K) with ``item_loss='items'``: a teacher's top K
            items for each position's own event (catalogue rows, -1: none) and its log-probabilities
            over them (:mod:`moe_rec.train.distill`); the item loss then adds ``distill_weight`` x
            the KL from the teacher's distribution to the model's over the same K items.

        Returns:
            ``logits`` (B, T', P, K_max) and, with ``labels``, ``loss`` = ``lm_loss`` + ``aux_loss``,
            ``lm_loss`` the item loss plus ``text_loss_weight`` x ``text_loss`` (with ``text_labels``).
        """
        p = self.config.item_vector_dropout
        self._kept_vectors = None  # one draw per forward: an item is left out as input and as candidate
        if self.training and p and self.item_embed is not None:
            self._kept_vectors = torch.rand(self.config.num_items, device=item_tokens.device) >= p
        query_services = self.asked_services(item_tokens, query_services)  # (B, T)
        hidden, _, auxes = self.model(
            None,
            domain_ids,
            user_ids=user_ids,
            attention_mask=attention_mask,
            inputs_embeds=self.embed_positions(item_tokens),
        )
        own_rows = self.prior_rows(item_tokens, query_services) if self.text_prior is not None else None
        words = self.critique_words(item_tokens, hidden) if self.word_weight is not None else None
        phrases = None
        if self.phrase_weight is not None:
            phrases = self.critique_phrases(item_tokens, hidden, query_services)
        if self.previous_weight is not None:
            phrases = phrases + self.critique_previous(item_tokens, hidden, query_services)
        ordinals = (
            self.critique_ordinals(item_tokens, hidden, query_services) if self.ordinal_fields() else None
        )
        if logits_to_keep:
            hidden, query_services = hidden[:, -logits_to_keep:], query_services[:, -logits_to_keep:]
            own_rows = own_rows[:, -logits_to_keep:] if own_rows is not None else None
            words = words[:, -logits_to_keep:] if words is not None else None
            phrases = phrases[:, -logits_to_keep:] if phrases is not None else None
            ordinals = ordinals[:, -logits_to_keep:] if ordinals is not None else None
        # training on the item loss needs only the scored positions' code scores (below), not the
        # (B, T, P, K) logits: they are made everywhere else (evaluation, the probe, the codes loss)
        skip_logits = labels is not None and self.config.item_loss == "items" and self.training
        logits = None if skip_logits else self.code_logits(hidden, query_services)  # (B, T', P, K)
        out = MoERecOutput(logits=logits, **{CACHE_FIELD: None}, **router_stats(auxes, self.config))
        if self.item_embed is not None:  # the per-item term reads the query: hand it out
            query = self.query(hidden, query_services)  # (B, T', D)
            out.hidden_states = self.item_query(query, query_services, own_rows, words, phrases, ordinals)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            target = labels[:, 1:]  # (B, T-1, P): the next event's codes
            if not bool((target[..., 0] != IGNORE_INDEX).any()):  # no event to predict (text only)
                out.lm_loss = self.code_logits(hidden, query_services).sum() * 0.0  # the heads in the graph
            elif self.config.item_loss == "items":
                query = out.hidden_states[:, :-1] if self.item_embed is not None else None
                own = own_rows[:, :-1] if own_rows is not None else None
                teacher = None
                if teacher_rows is not None and teacher_log_probs is not None:
                    teacher = (teacher_rows[:, 1:], teacher_log_probs[:, 1:])
                out.lm_loss = self._item_softmax_loss(
                    hidden[:, :-1], target, query_services[:, :-1], query, own,
                    self._position_weights(item_tokens[:, :-1, 0]), teacher,
                )  # fmt: skip
            else:
                out.lm_loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
            if text_labels is not None and self.config.text_token_range is not None:
                written = text_labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t writes t + 1
                if bool(written.any()):  # only the positions that write text pay for the head
                    rows = (
                        self.explained_rows(item_tokens)[:, :-1][written]
                        if self.copy_weight is not None
                        else None
                    )
                    history = (
                        self.history_shares(item_tokens, *written.nonzero(as_tuple=True))
                        if self.history_copy_weight is not None
                        else None
                    )
                    logits_t = self.text_logits(hidden[:, :-1][written], rows, history).float()
                    out.text_loss = F.cross_entropy(logits_t, text_labels[:, 1:][written])
                    out.lm_loss = out.lm_loss + self.config.text_loss_weight * out.text_loss
            out.loss = out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        return out

    def _position_weights(self, first: torch.Tensor) -> torch.Tensor | None:
        """(B, T) the item loss's weight of each position from its first token (B, T):
        ``critique_loss_weight`` where it is a text token (a critique's last word: the position that
        ranks the critique's target), 1 elsewhere; None when every weight is 1."""
        w = self.config.critique_loss_weight
        if w == 1.0 or self.config.text_token_range is None:
            return None
        start, stop = self.config.text_token_range
        steered = (first >= start) & (first < stop)
        return 1.0 + (w - 1.0) * steered.float()

    def draw_negatives_from(self, seed: int | None) -> None:
        """Until called again, every forward draws its ``item_negatives`` of each service from a
        generator seeded by ``seed`` and the service, so forwards between two calls score the same
        items: the trainer calls it once per optimizer step (``train.negatives_per_step``), so a
        step's micro batches share one draw as one large batch would. None: a fresh draw each forward."""
        self._negatives_seed = seed

    def _draw_negatives(self, rows: torch.Tensor, service: int) -> torch.Tensor:
        """(<= item_negatives,) distinct items of ``rows`` (one service's), drawn uniformly."""
        generator = None
        if self._negatives_seed is not None:
            generator = torch.Generator(device=rows.device).manual_seed(self._negatives_seed * 4099 + service)
        draws = torch.randint(
            len(rows), (self.config.item_negatives,), device=rows.device, generator=generator
        )
        return rows[draws].unique()

    def _item_softmax_loss(
        self,
        hidden: torch.Tensor,
        target: torch.Tensor,
        services: torch.Tensor,
        query: torch.Tensor | None,
        own_rows: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean over scored positions of ``logsumexp_i s_i - s_target`` over the items i of the
        target's service, ``s_i`` the mean of item i's code logits; with ``item_negatives`` over
        the target and that many items of its service drawn uniformly (each drawn item once, a drawn
        copy of the target left out), so a step costs (positions x samples) instead of (positions x
        catalogue). Positions are grouped by asked service: each scores its own service's items only.

        Each service's code scores are one (P, K, M_s) product of its unit code embeddings, scaled
        by 1 / (temperature x P), with its positions' unit queries: the mean of an item's code
        logits (:meth:`code_logits`) without making the (B, T, P, K) logits of every position.

        Args:
            hidden: (B, T, D) decoder outputs; target: (B, T, P) next codes (-100: no target);
            services: (B, T) the target's service token.
            query: (B, T, D') with ``item_embedding``: an item's logit also gets ``query .
                score_vector`` (:meth:`item_query`, :meth:`score_vectors`).
            own_rows: (B, T) with ``item_text_prior``: the item the prior reads at each position
                (:meth:`prior_rows`), whose own text prior is 0.
            weights: (B, T) each position's weight (:meth:`_position_weights`); None: all 1. The sum
                of weighted losses is divided by the number of scored positions either way, so the
                other positions' gradients do not change.
            teacher: (B, T, K) catalogue rows (-1: none) and log-probabilities of a teacher's top K
                items at each position: each scored position adds ``distill_weight`` x
                ``sum_k p_k (log p_k - log q_k)``, ``q`` the softmax of this model's logits over
                the same K items (:meth:`_distill_terms`), to its loss.

        With ``item_loss_balance='services'`` the result is instead the mean over the asked services
        of each service's (weighted) loss sum divided by its number of scored positions.
        """
        if self.train_codes is None:
            raise ValueError(
                "item_loss='items' needs the catalogue: call set_train_catalogue(codes, services)"
            )
        scored = target[..., 0] != IGNORE_INDEX  # (B, T)
        asked = services[scored]  # (M,)
        queries = self.code_queries(hidden[scored][None], asked[None])[0].float()  # (M, P, D)
        # an item's logit is the mean of its code logits (the sum of P cosines / T would span +-P/T
        # and saturate the softmax)
        scale = 1.0 / (self.config.item_head_temperature * self.num_codes)
        tgt = target[scored]  # (M, P)
        q = query[scored].float() if query is not None else None  # (M, D)
        own = own_rows[scored] if own_rows is not None else None  # (M,)
        weight = weights[scored] if weights is not None else None  # (M,)
        taught = None  # (M, K) the teacher's rows and log-probabilities at the scored positions
        if teacher is not None and self.config.distill_weight:
            taught = (teacher[0][scored], teacher[1][scored].float())
        catalogue_kl = taught is not None and self.config.distill_over == "catalogue"
        target_rows = None  # (M,) the targets' catalogue rows: for the per-item term, and for the
        # catalogue KL with drawn negatives (a teacher item that is the target is a candidate already)
        if q is not None or (catalogue_kl and self.config.item_negatives):
            target_rows = self.item_rows(tgt, asked)
        target_extra = None  # (M,) the target's per-item term, beside its code scores
        if q is not None:
            target_extra = (q * self.score_vectors(target_rows).float()).sum(-1)
            if own is not None:  # a repeat of the own item gets no text prior
                target_extra = target_extra + self.own_item_term(q, own) * (target_rows == own)
        groups = []  # per asked service: its positions and its candidate items
        for service in asked.unique().tolist():  # each service's positions against its own items only
            rows = self._service_rows(service)  # (N_s,) every trained item of the service
            if self.config.item_negatives:  # that many draws, each drawn item once
                rows = self._draw_negatives(rows, service)
            groups.append((service, (asked == service).nonzero().flatten(), rows))
        taught_vectors = None  # (U, D') score vectors of the teacher's items, (M, K) each one's index
        if q is not None:  # one lookup for every group (under ZeRO-3 each call gathers, on every rank)
            wanted = [rows for _, _, rows in groups]
            if taught is not None:  # the teachers' top items repeat across positions: each once
                unique, where = taught[0].clamp_min(0).unique(return_inverse=True)
                wanted.append(unique)
            vectors = self.score_vectors(torch.cat(wanted)).float().split([len(rows) for rows in wanted])
            if taught is not None:
                taught_vectors = (vectors[-1], where)
        total = queries.new_zeros(())
        by_service = self.config.item_loss_balance == "services"
        shared = self.code_keys().float() * scale if self.service_code_embed is None else None  # (P, K, D)
        for g, (service, pos, rows) in enumerate(groups):
            if shared is None:  # each service's own code rows
                keys = self.code_keys(int(self.service_slots(torch.tensor(service)))).float() * scale
            else:
                keys = shared
            by_code = torch.bmm(keys, queries[pos].permute(1, 2, 0))  # (P, K, M_s)
            target_score = by_code.gather(1, tgt[pos].T[:, None, :]).squeeze(1).sum(0)  # (M_s,)
            if target_extra is not None:
                target_score = target_score + target_extra[pos]
            codes = self.train_codes[rows]  # (C, P)
            scores = gather_scores(by_code, codes).T  # (M_s, C)
            if q is not None:
                scores = scores + self.query_scores(q[pos], vectors[g])
                if own is not None:  # the own item among the candidates: no text prior
                    scores = scores + self.own_item_term(q[pos], own[pos])[:, None] * (
                        rows[None] == own[pos][:, None]
                    )
            if self.config.item_negatives:  # the target scored once, in front: a drawn copy is dropped
                copy = same_codes(tgt[pos], codes)  # (M_s, C)
                scores = torch.cat([target_score[:, None], scores.masked_fill(copy, float("-inf"))], dim=1)
            norm = torch.logsumexp(scores, dim=1)  # (M_s,)
            loss = norm - target_score
            if taught is not None:
                outside = None  # (M_s, K) with distill_over='catalogue': a teacher item no candidate above
                if catalogue_kl:
                    outside = ~torch.isin(taught[0][pos], rows)
                    if self.config.item_negatives:  # the target is a candidate, drawn or not
                        outside &= taught[0][pos] != target_rows[pos][:, None]
                loss = loss + self.config.distill_weight * self._distill_terms(
                    by_code, taught[0][pos], taught[1][pos],
                    q[pos] if q is not None else None,
                    (taught_vectors[0], taught_vectors[1][pos]) if taught_vectors is not None else None,
                    own[pos] if own is not None else None,
                    (norm, outside) if outside is not None else None,
                )  # fmt: skip
            summed = (loss if weight is None else loss * weight[pos]).sum()
            total = total + (summed / len(pos) if by_service else summed)
        return total / (len(groups) if by_service else len(asked))

    def _distill_terms(
        self,
        by_code: torch.Tensor,
        rows: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        query: torch.Tensor | None,
        vectors: tuple[torch.Tensor, torch.Tensor] | None,
        own: torch.Tensor | None,
        candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(M_s,) ``KL(p || q)`` at each of one service's positions: ``p`` the teacher's
        distribution over its K items (``rows`` (M_s, K), -1: none, ``teacher_log_probs`` (M_s, K)),
        ``q`` the softmax of this model's logits over the same items, scored as
        :meth:`_item_softmax_loss` scores its candidates (``by_code`` (P, K_codes, M_s) the scaled
        code scores, ``query`` (M_s, D') and ``vectors`` the per-item term: (U, D') score vectors
        and (M_s, K) each item's index among them; ``own`` (M_s,) the prior's own item), or with
        ``candidates`` (``distill_over='catalogue'``: (M_s,) the log-sum-exp of the item loss's
        candidates' logits and (M_s, K) which of the K are none of them) its softmax over the
        candidates and the K, read at the K. A position with no teacher row adds 0."""
        known = rows >= 0  # (M_s, K)
        codes = self.train_codes[rows.clamp_min(0)]  # (M_s, K, P)
        logits = by_code.permute(2, 0, 1).gather(2, codes.transpose(1, 2)).sum(1)  # (M_s, K)
        if query is not None and vectors is not None:
            table, index = vectors
            d = self.config.hidden_size
            # past the learned part (D) a model without critique parts has only its items' unit
            # texts, which no gradient moves: read them detached, so the backward pass makes no
            # (M_s, K, D') gradient (most of a step's time otherwise)
            critique = (
                self.word_weight is not None or self.phrase_weight is not None or bool(self.ordinal_fields())
            )
            if critique or table.shape[-1] == d:
                logits = logits + torch.einsum("md,mkd->mk", query, table[index])
            else:
                logits = logits + torch.einsum("md,mkd->mk", query[:, :d], table[:, :d][index])
                logits = logits + torch.einsum("md,mkd->mk", query[:, d:], table[:, d:].detach()[index])
            if own is not None:  # the own item among them: no text prior
                logits = logits + self.own_item_term(query, own)[:, None] * (rows == own[:, None])
        # finite fills: a position with no row at all must give 0 and a finite gradient, not NaN
        if candidates is None:
            log_q = torch.log_softmax(logits.masked_fill(~known, -1e9), dim=1)
        else:
            norm, outside = candidates
            extra = torch.logsumexp(logits.masked_fill(~(known & outside), -1e9), dim=1)
            log_q = logits - torch.logaddexp(norm, extra)[:, None]
        teacher = teacher_log_probs.masked_fill(~known, 0.0)
        return torch.where(known, teacher.exp() * (teacher - log_q), 0.0).sum(1)
