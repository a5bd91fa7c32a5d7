"""Writing narratives: greedy decoding with the item-level model's text head, after ``[EXPLAIN]``.

A prompt is a request's history (and critique), the recommended item and ``[EXPLAIN]``; each step
runs the decoder over every unfinished prompt (left-padded, no cache: narratives are short and the
model small) and appends the most likely subword, until ``[EOS]`` or ``max_tokens``. As greedy
decoders usually do, a subword that would repeat a ``no_repeat_ngram``-gram of the narrative, or
the subword just written, is never chosen (an undertrained head otherwise loops: "bought bought
bought ...").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moe_rec.data.positions import item_batch
from moe_rec.data.vocab import EXPLAIN, Vocabulary
from moe_rec.model.item_model import MoERecForItemPrediction

MAX_NARRATIVE_TOKENS = 64
NO_REPEAT_NGRAM = 3


def repeated(text: Sequence[int], n: int) -> set[int]:
    """Tokens that would end an ``n``-gram already in ``text`` (what greedy decoding must not
    write next)."""
    if n < 1 or len(text) < n - 1:
        return set()
    tail = tuple(text[len(text) - n + 1 :]) if n > 1 else ()
    return {text[i + n - 1] for i in range(len(text) - n + 1) if tuple(text[i : i + n - 1]) == tail}


def narrative_prompt(
    request: dict[str, Any], item_tokens: Sequence[int], vocab: Vocabulary
) -> dict[str, Any]:
    """A request (``input_ids`` / ``domain_ids`` ending in the asked service's token) turned into
    the prompt of a narrative for one of its items: the service token replaced by the item's
    tokens, then ``[EXPLAIN]``."""
    domain = item_tokens[0] - vocab.service_offset  # the item's service index
    return {
        "input_ids": [*request["input_ids"][:-1], *item_tokens, EXPLAIN],
        "domain_ids": [*request["domain_ids"][:-1], *[domain] * (len(item_tokens) + 1)],
    }


@torch.no_grad()
def write_narratives(
    model: MoERecForItemPrediction,
    prompts: Sequence[dict[str, Any]],
    user_buckets: Sequence[int],
    vocab: Vocabulary,
    max_tokens: int = MAX_NARRATIVE_TOKENS,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
) -> list[list[int]]:
    """Each prompt's narrative as subword ids (0 .. text_size - 1), greedy, without its ``[EOS]``,
    no ``no_repeat_ngram``-gram twice (0: no such rule); cut at ``max_tokens``."""
    device = next(model.parameters()).device
    rows = [
        {"input_ids": list(p["input_ids"]), "domain_ids": list(p["domain_ids"]), "user": ""} for p in prompts
    ]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(max_tokens):
        if not live:
            break
        batch = item_batch([rows[i] for i in live], vocab, 1, left_pad=True)
        batch["user_ids"] = torch.tensor([user_buckets[i] for i in live])
        logits = model.next_text_logits(**{k: v.to(device) for k, v in batch.items()})  # (B, V + 1)
        for b, i in enumerate(live):
            banned = repeated(out[i], no_repeat_ngram) | set(
                out[i][-1:]
            )  # nor the same subword twice in a row
            if banned:
                logits[b, sorted(banned)] = float("-inf")
        still = []
        for i, token in zip(live, logits.argmax(-1).tolist(), strict=True):
            if token == vocab.text_size:  # [EOS]
                continue
            out[i].append(token)
            rows[i]["input_ids"].append(vocab.text_offset + token)
            rows[i]["domain_ids"].append(rows[i]["domain_ids"][-1])
            still.append(i)
        live = still
    return out
