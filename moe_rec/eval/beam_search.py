"""Trie-constrained batched beam search over semantic IDs, with the KV cache.

A recommendation is the ``L+1`` codes ``(c_1..c_L, dedup)`` that follow the requested service's
token. Beam search keeps ``W`` prefixes per prompt and extends all ``B*W`` of them at once: one
cached forward step per depth, the next-code mask of every beam from :meth:`SIDTrie.allowed` (a
few tensor ops, no Python callback per beam), log-probabilities summed, and a stable sort over
``W * V_d`` candidates per prompt so ties always resolve the same way (lower beam, then lower
code). Every full ID names exactly one item, so the ``W`` finished beams are ``W`` distinct
items, sorted by score.

Scores are sums of log-probabilities under the model's full-vocabulary softmax (what teacher
forcing the item's tokens gives), not renormalised over the allowed codes, so they compare
across prompts and services. When fewer than ``W`` valid continuations exist, the remaining
beams have score ``-inf`` and codes ``-1``.

Cost: one prefill over the ``B`` prompts (not ``B*W`` copies of them, as ``generate`` does),
then ``L`` single-token steps over ``B*W`` beams; the last depth needs no forward pass after it.
After the prefill the cache is a :class:`BeamCache`: the beams of a prompt share its keys and
values, so a step reads each prompt's keys once and a beam reorder moves only the ``<= L``
generated tokens (with a ``DynamicCache`` both copied ``W`` copies of every prompt per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moe_rec.data.vocab import Vocabulary
from moe_rec.model.cache import BeamCache, MoERecCache
from moe_rec.model.modeling import MoERecForCausalLM
from moe_rec.sid.trie import SIDTrie, check_radices, in_range, pack_codes


def _excluded_keys(
    exclude_codes: Sequence[torch.Tensor], radices: list[int], device: torch.device
) -> torch.Tensor:
    """Sorted int64 keys of ``(prompt b, c_1..c_{L+1})`` for every excluded ID (out-of-range rows dropped)."""
    check_radices(radices)
    ids = [c.cpu().long().reshape(-1, len(radices) - 1) for c in exclude_codes]  # (n_b, L+1) each
    rows = [torch.cat([torch.full((len(c), 1), b, dtype=torch.long), c], 1) for b, c in enumerate(ids)]
    digits = torch.cat(rows, 0).to(device)  # (N_ex, 1 + L+1)
    digits = digits[in_range(digits, radices)]
    return torch.sort(pack_codes(digits, radices)).values


@torch.no_grad()  # not inference_mode: ZeRO-3 re-partitions parameters gathered during validation
def constrained_beam_search(
    model: MoERecForCausalLM,
    trie: SIDTrie,
    vocab: Vocabulary,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    domain_ids: torch.Tensor,
    user_ids: torch.Tensor | None,
    services: Sequence[str],
    beam_width: int,
    exclude_codes: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``beam_width`` best valid items of each prompt's requested service.

    Args:
        model: the decoder (its ``config.sid_token_offset`` is added to every token id).
        trie: valid IDs of every service (moved to the model's device if needed).
        vocab: the token layout (service tokens, the token range of each depth, domain ids).
        input_ids: (B, T) vocabulary token ids, left-padded, each row ending with the token of
            ``services[b]``.
        attention_mask: (B, T) 1 for real tokens, 0 for left padding.
        domain_ids: (B, T) service index of each token.
        user_ids: (B,) hashed user buckets, or None when the router does not read them.
        services: (B,) the service to recommend from, per prompt.
        beam_width: W, beams kept per prompt and items returned.
        exclude_codes: optional (B,) list of (n_b, L+1) full IDs never to return for prompt b
            (e.g. items already seen); masked at the last depth.

    Returns:
        codes (B, W, L+1) long and scores (B, W) float32 (summed log-probabilities), best first;
        codes ``-1`` and score ``-inf`` where fewer than W items are reachable.
    """
    device = input_ids.device
    b, _ = input_ids.shape
    w, depth = beam_width, trie.depth
    if w < 1:
        raise ValueError(f"beam_width must be >= 1, got {w}")
    if len(services) != b:
        raise ValueError(f"{len(services)} services for a batch of {b}")
    if depth != vocab.levels + 1:
        raise ValueError(f"the trie has {depth} code positions, the vocabulary {vocab.levels + 1}")
    if exclude_codes is not None and len(exclude_codes) != b:
        raise ValueError(f"{len(exclude_codes)} exclusion lists for a batch of {b}")
    service_tokens = torch.tensor([vocab.service_token(s) for s in services], device=device)
    if not torch.equal(input_ids[:, -1], service_tokens):
        raise ValueError("every prompt must end with the token of its requested service (left padding)")
    if trie.device != device:
        trie = trie.to(device)
    service_ids = trie.service_ids(list(services), b)  # (B,) trie indices
    domain = torch.tensor([vocab.service_index(s) for s in services], device=device)
    domain = domain.repeat_interleave(w)[:, None]  # (B*W, 1) domain of generated tokens
    users = user_ids.repeat_interleave(w) if user_ids is not None else None
    offset = model.config.sid_token_offset
    excluded = None
    if exclude_codes is not None:
        excluded = _excluded_keys(exclude_codes, [b, *trie.vocab_sizes], device)

    out = model(
        input_ids + offset,
        domain_ids,
        user_ids=user_ids,
        attention_mask=attention_mask,
        past_key_values=MoERecCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.kv_cache, out.logits[:, -1]  # logits (B*n, V)
    mask = attention_mask.repeat_interleave(w, dim=0)  # (B*W, T)
    n = 1  # live beams per prompt: one until the first expansion, then W
    scores = torch.zeros(b, n, device=device)  # (B, n)
    codes = torch.zeros(b, 0, dtype=torch.long, device=device)  # (B*n, d) prefixes
    for d in range(depth):
        start, stop = vocab.code_token_range(d)
        v = stop - start
        logp = torch.log_softmax(logits.float(), dim=-1)[:, start + offset : stop + offset]  # (B*n, V_d)
        allowed = trie.allowed(service_ids.repeat_interleave(n), codes)  # (B*n, V_d)
        if excluded is not None and d == depth - 1 and len(excluded):
            prompt = torch.arange(b, device=device).repeat_interleave(n)[:, None]  # (B*n, 1)
            prefix = pack_codes(torch.cat([prompt, codes], 1), [b, *trie.vocab_sizes[:d]])  # (B*n,)
            cand = prefix[:, None] * v + torch.arange(v, device=device)  # (B*n, V_d) packed full IDs
            pos = torch.searchsorted(excluded, cand).clamp_max(len(excluded) - 1)
            allowed = allowed & (excluded[pos] != cand)
        cand_scores = scores.reshape(-1, 1) + logp.masked_fill(~allowed, float("-inf"))  # (B*n, V_d)
        flat = cand_scores.reshape(b, n * v)  # (B, n*V_d)
        if n * v < w:  # too few candidates to fill the beam: pad with dead ones
            flat = F.pad(flat, (0, w - n * v), value=float("-inf"))  # (B, W)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :w]  # (B, W)
        scores = flat.gather(1, order)  # (B, W)
        parent = (torch.arange(b, device=device)[:, None] * n + (order // v).clamp_max(n - 1)).reshape(-1)
        codes = torch.cat([codes[parent], (order % v).reshape(-1, 1)], 1)  # (B*W, d+1)
        n = w
        if d < depth - 1:  # feed the chosen code; the dedup code needs no forward pass
            if d == 0:  # first expansion: each prompt's W beams start from the prompt (parent = b)
                cache = BeamCache(cache, w, max_new_tokens=depth - 1)
            else:
                cache.reorder_cache(parent)  # (B*W) -> (B*W) rows within each prompt, profile included
            mask = torch.cat([mask, mask.new_ones(b * w, 1)], 1)  # (B*W, T+d+1)
            out = model(
                codes[:, -1:] + start + offset,
                domain,
                user_ids=users,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]  # (B*W, V)
    codes = codes.reshape(b, w, depth)
    codes = codes.masked_fill(torch.isneginf(scores)[..., None], -1)
    return codes, scores
