"""Writing narratives: greedy decoding with the item-level model's text head, after ``[EXPLAIN]``.

A prompt is a request's history (and critique), the recommended item and ``[EXPLAIN]``; each step
appends every unfinished narrative's most likely subword, until ``[EOS]`` or ``max_tokens``. As
greedy decoders usually do, a subword that would repeat a ``no_repeat_ngram``-gram of the
narrative, or the subword just written, is never chosen (an undertrained head otherwise loops:
"bought bought bought ...").
A list that names one thing twice ("mostly wigs and wigs": both slots copy the history's most
frequent category, and the trigram rule cannot see it) is written once (:func:`merge_repeats`), as
the narratives' own templates write a list of one.

Two ways to get each step's logits, the same greedy loop around them (:func:`write_narratives`):

* **cached** (the default; serving and ``moe-rec eval --narratives``): one prefill over the
  left-padded prompts into a :class:`~moe_rec.model.cache.MoERecCache` (keys, values and the
  router's running profile), then each step feeds only the subword each unfinished narrative just
  wrote, one position per row, the attention mask growing by one column (positions count real
  tokens only, so the padding moves nothing); a finished narrative's row leaves the cache.
* **uncached** (``use_cache=False``, the plain reference the cached one is tested against): every
  step reruns the decoder over every unfinished prompt and what it has written so far, padded
  afresh.

Both give the same subwords and, step by step, the same logits up to fp32 rounding (the padding
and the summation order differ); ``tests/eval/test_narrate.py`` checks it on random models.
``tools/bench_narrate.py`` times the two (docs/critiques.md has the numbers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from moe_rec.data.positions import item_batch
from moe_rec.data.vocab import EXPLAIN, PAD, Vocabulary
from moe_rec.model.cache import MoERecCache
from moe_rec.model.item_model import MoERecForItemPrediction

MAX_NARRATIVE_TOKENS = 64
NO_REPEAT_NGRAM = 3
# up to 4 words, " and " or ", ", the same words, then punctuation, " and " or the end
_REPEATED_ITEM = re.compile(
    r"(?P<pre>, )?(?<![\w'&-])(?P<item>[\w'&-]+(?: [\w'&-]+){0,3})(?P<sep> and |, )(?P=item)"
    r"(?=[.,;:!?]| and |$)",
    re.IGNORECASE,
)


def repeated(text: Sequence[int], n: int) -> set[int]:
    """Tokens that would end an ``n``-gram already in ``text`` (what greedy decoding must not
    write next)."""
    if n < 1 or len(text) < n - 1:
        return set()
    tail = tuple(text[len(text) - n + 1 :]) if n > 1 else ()
    return {text[i + n - 1] for i in range(len(text) - n + 1) if tuple(text[i : i + n - 1]) == tail}


def merge_repeats(text: str) -> str:
    """``text`` with every list item that repeats the one before it dropped, the list joined as
    before ("a lot of wigs and wigs." -> "a lot of wigs."; "with ice, gel and gel" -> "with ice and
    gel")."""

    def once(m: re.Match) -> str:
        joined = " and " if m["pre"] and m["sep"] == " and " else m["pre"] or ""
        return joined + m["item"]

    while True:
        merged = _REPEATED_ITEM.sub(once, text)
        if merged == text:
            return text
        text = merged


def narrative_text(tokenizer: Any, ids: Iterable[int]) -> str:
    """A decoded narrative as shown: its subwords' text, repeated list items merged."""
    return merge_repeats(tokenizer.decode(ids))


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


# one step of a decoder: (unfinished prompts, every narrative so far) -> (len(live), V + 1) logits
Step = Callable[[list[int], list[list[int]]], torch.Tensor]


def _uncached_step(
    model: MoERecForItemPrediction,
    prompts: Sequence[dict[str, Any]],
    user_buckets: Sequence[int],
    vocab: Vocabulary,
) -> Step:
    """Each step a whole forward over the unfinished prompts and their narratives so far, left-padded."""
    device = next(model.parameters()).device

    def step(live: list[int], out: list[list[int]]) -> torch.Tensor:
        rows = []
        for i in live:
            p, written = prompts[i], [vocab.text_offset + t for t in out[i]]
            rows.append({
                "input_ids": [*p["input_ids"], *written],
                "domain_ids": [*p["domain_ids"], *[p["domain_ids"][-1]] * len(written)],
                "user": "",
            })  # fmt: skip
        batch = item_batch(rows, vocab, 1, left_pad=True)
        batch["user_ids"] = torch.tensor([user_buckets[i] for i in live])
        return model.next_text_logits(**{k: v.to(device) for k, v in batch.items()})  # (B, V + 1)

    return step


def _cached_step(
    model: MoERecForItemPrediction,
    prompts: Sequence[dict[str, Any]],
    user_buckets: Sequence[int],
    vocab: Vocabulary,
) -> Step:
    """The first step a prefill of every prompt into a :class:`MoERecCache`; each later one feeds
    the last subword of each unfinished narrative (a text position: its token, then ``[PAD]``),
    after dropping the finished ones' rows from the cache."""
    device = next(model.parameters()).device
    rows = [{"input_ids": p["input_ids"], "domain_ids": p["domain_ids"], "user": ""} for p in prompts]
    batch = {k: v.to(device) for k, v in item_batch(rows, vocab, 1, left_pad=True).items()}
    state = {
        "cache": MoERecCache(),
        "rows": list(range(len(prompts))),  # the prompt of each cache row
        "mask": batch["attention_mask"],  # (B, S) real positions so far, cached ones included
        "users": torch.tensor(list(user_buckets), device=device),
        "domains": torch.tensor([p["domain_ids"][-1] for p in prompts], device=device)[:, None],  # (B, 1)
    }
    if model.copy_weight is not None:  # narrative_copy: the items the narratives are about (B,)
        state["explained"] = model.explained_rows(batch["item_tokens"])[:, -1]
    if model.history_copy_weight is not None:  # narrative_history_copy: their histories (B, F, V + 1)
        state["history"] = model.prompt_history(batch["item_tokens"])
    slots = batch["item_tokens"].shape[-1]

    def step(live: list[int], out: list[list[int]]) -> torch.Tensor:
        cache = state["cache"]
        if cache.get_seq_length() == 0:  # the prefill
            return model.next_text_logits(
                batch["item_tokens"], batch["domain_ids"], state["users"], batch["attention_mask"],
                past_key_values=cache,
            )  # fmt: skip
        if live != state["rows"]:  # narratives finished: their rows leave the cache
            where = {i: r for r, i in enumerate(state["rows"])}
            keep = torch.tensor([where[i] for i in live], device=device)
            cache.batch_select_indices(keep)
            for key in ("mask", "users", "domains", "explained", "history"):
                if key in state:
                    state[key] = state[key][keep]
            state["rows"] = list(live)
        tokens = torch.full((len(live), 1, slots), PAD, dtype=torch.long)
        tokens[:, 0, 0] = torch.tensor([vocab.text_offset + out[i][-1] for i in live])
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(live), 1)], dim=1)
        return model.next_text_logits(
            tokens.to(device), state["domains"], state["users"], state["mask"], past_key_values=cache,
            explained_rows=state.get("explained"), history_bags=state.get("history"),
        )  # fmt: skip

    return step


@torch.no_grad()
def write_narratives(
    model: MoERecForItemPrediction,
    prompts: Sequence[dict[str, Any]],
    user_buckets: Sequence[int],
    vocab: Vocabulary,
    max_tokens: int = MAX_NARRATIVE_TOKENS,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    *,
    use_cache: bool = True,
    step_logits: list[tuple[list[int], torch.Tensor]] | None = None,
) -> list[list[int]]:
    """Each prompt's narrative as subword ids (0 .. text_size - 1), greedy, without its ``[EOS]``,
    no ``no_repeat_ngram``-gram twice (0: no such rule); cut at ``max_tokens``.

    Args:
        use_cache: prefill once and feed one subword a step (True), or rerun every prompt in full
            each step (False: the reference).
        step_logits: when given, each step appends the prompts it decoded and their logits
            ``(len(live), V + 1)`` before any subword was banned (for tests).
    """
    if not prompts:
        return []
    step = (_cached_step if use_cache else _uncached_step)(model, prompts, user_buckets, vocab)
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(max_tokens):
        if not live:
            break
        logits = step(live, out)  # (B, V + 1)
        if step_logits is not None:
            step_logits.append((list(live), logits.detach().clone()))
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
            still.append(i)
        live = still
    return out
