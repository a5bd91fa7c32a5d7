"""Critique and narrative samples for the item-level model (LUMEN, REGEN arXiv 2503.11924): one
sequence holds a history, optionally a critique in words, the item, and the item's narrative.

Built by the sequences stage from the critiques stage's rows (:mod:`moe_rec.data.critiques`,
:mod:`moe_rec.data.narratives`) and the subword tokenizer (:mod:`moe_rec.data.text_tokenizer`):

* **critique -> item** (train): ``[BOS] history [CRITIQUE] words target``. Only the target is a
  label: the history is trained by the plain windows already, and a critique sample would
  otherwise weigh its history twice.
* **item -> narrative** (train): ``[BOS] history target [EXPLAIN] words [EOS]``: the target is a
  label (predicted from the history), and the words and ``[EOS]`` are text labels.
* **critique requests** (``critique_valid`` / ``critique_test``): ``[BOS] history [CRITIQUE] words
  [service]``, the evaluation request of the critique's split with the critique before the asked
  service; :func:`without_critique` gives the same request without it, so the two rank the same
  targets.

A training sample's history is the user's unified training history before the target (as the
plain windows see it); a request's is the leave-one-out context of its target (as the plain
requests see it). At most ``critiques_per_user`` / ``narratives_per_user`` training samples per
user (the latest), so the text tasks add to an epoch rather than dominate it; words beyond
``max_text_tokens`` are cut (and counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from moe_rec.data.sequences import IGNORE_INDEX, SAMPLE_FEATURES, Event, SequenceBuilder, unified_order
from moe_rec.data.text_tokenizer import TextTokenizer
from moe_rec.data.vocab import CRITIQUE, EOS, EXPLAIN

CRITIQUE_SPLITS = {"valid": "critique_valid", "test": "critique_test"}
REQUEST_FEATURES = datasets.Features(
    {
        **SAMPLE_FEATURES["test"],
        "prev_item": datasets.Value("string"),
        "critique": datasets.Value("string"),
        "types": datasets.Sequence(datasets.Value("string")),
        "family": datasets.Value("string"),
        "held_out": datasets.Value("bool"),
    }
)


@dataclass
class TextSampleConfig:
    """``sequences.text``: how critique and narrative rows become samples."""

    critiques_per_user: int = 4  # latest training critiques per user that become samples (0: none)
    narratives_per_user: int = 2  # latest training narratives per user that become samples (0: none)
    tokenizer_size: int = 4096  # subwords of the byte-level BPE trained on the run's text
    max_text_tokens: int = 48  # a critique's or narrative's words are cut after this many subwords

    def __post_init__(self) -> None:
        if self.critiques_per_user < 0 or self.narratives_per_user < 0:
            raise ValueError("sequences.text: critiques_per_user and narratives_per_user must be >= 0")
        if self.tokenizer_size < 257 or self.max_text_tokens < 1:
            raise ValueError("sequences.text: tokenizer_size must be > 256 and max_text_tokens >= 1")


class TextSampleBuilder:
    """Critique and narrative rows of one user -> token samples (module docstring).

    Args:
        builder: the plain samples' builder (vocabulary, item codes, history cap).
        tokenizer: the text tokenizer; its ids sit at ``vocab.text_offset`` onwards.
        cfg: per-user caps and the text length cap.
    """

    def __init__(self, builder: SequenceBuilder, tokenizer: TextTokenizer, cfg: TextSampleConfig) -> None:
        if builder.vocab.text_size != tokenizer.size:
            raise ValueError(
                f"vocabulary has {builder.vocab.text_size} text tokens, tokenizer {tokenizer.size}"
            )
        self.builder, self.tokenizer, self.cfg = builder, tokenizer, cfg
        self.counts: Counter[str] = Counter()

    def words(self, text: str) -> list[int]:
        """Vocabulary ids of ``text``'s subwords, cut at ``max_text_tokens`` (cuts counted)."""
        ids = self.tokenizer.encode(text)
        if len(ids) > self.cfg.max_text_tokens:
            self.counts["text_cut"] += 1
            ids = ids[: self.cfg.max_text_tokens]
        return [self.builder.vocab.text_offset + i for i in ids]

    def _train_prefix(self, ordered: list[Event], target: Event) -> list[Event]:
        """The training events before ``target`` in the unified history, the most recent
        ``max_events - 1`` (the target takes the last slot)."""
        before = []
        for e in ordered:
            if e.service == target.service and e.position == target.position:
                break
            if e.split == "train":
                before.append(e)
        return before[-(self.builder.cfg.max_events - 1) :] if self.builder.cfg.max_events > 1 else []

    def _sample(
        self, user: str, service: str, history: Sequence[Event], tail: list[tuple[list[int], bool]]
    ) -> dict:
        """``[BOS] history`` (no labels) + ``tail``: token runs, each with or without labels; every
        token of the tail is of ``service``'s domain."""
        enc = self.builder.encode(history, label_items=False)
        ids, domains = enc["input_ids"], enc["domain_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        domain = self.builder.vocab.service_index(service)
        for tokens, labelled in tail:
            ids += tokens
            domains += [domain] * len(tokens)
            labels += tokens if labelled else [IGNORE_INDEX] * len(tokens)
        if not history:  # [BOS] takes the first token's domain
            domains[0] = domain
        return {"user": user, "service": service, "input_ids": ids, "domain_ids": domains, "labels": labels}

    def _target_tokens(self, target: Event) -> list[int]:
        """The target event's tokens with its service token unlabelled (given, not predicted)."""
        return self.builder.vocab.item_tokens(target.service, self.builder.event_codes(target))

    def train_samples(
        self, user: str, events: Sequence[Event], critiques: Sequence[dict], narratives: Sequence[dict]
    ) -> Iterator[dict[str, Any]]:
        """The user's latest training critique and narrative rows as samples (module docstring)."""
        ordered = unified_order(events, self.builder.vocab.services)
        by_key = {(e.service, e.position): e for e in ordered}
        picks = (
            (critiques, self.cfg.critiques_per_user, "critique"),
            (narratives, self.cfg.narratives_per_user, "narrative"),
        )
        for rows, cap, kind in picks:
            train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["position"])
            for row in train[len(train) - cap :] if cap else []:
                target = by_key.get((row["service"], row["position"]))
                if target is None or target.item_id != row["target_item"]:
                    self.counts[f"{kind}_not_in_history"] += 1
                    continue
                history, item = self._train_prefix(ordered, target), self._target_tokens(target)
                service_token, codes = item[:1], item[1:]
                if kind == "critique":
                    tail = [
                        ([CRITIQUE, *self.words(row["text"])], False),
                        (service_token, False),
                        (codes, True),
                    ]
                else:
                    tail = [
                        (service_token, False),
                        (codes, True),
                        ([EXPLAIN], False),
                        ([*self.words(row["text"]), EOS], True),
                    ]
                self.counts[f"{kind}_samples"] += 1
                yield self._sample(user, row["service"], history, tail)

    def requests(
        self, user: str, events: Sequence[Event], critiques: Sequence[dict], split: str
    ) -> Iterator[dict]:
        """One request per ``split`` critique of the user: the plain request of its target with the
        critique before the asked service."""
        plain = {(r["service"], r["target_item"]): r for r in self.builder.eval_samples(user, events, split)}
        for row in critiques:
            if row["split"] != split:
                continue
            request = plain.get((row["service"], row["target_item"]))
            if request is None:
                self.counts["request_not_in_split"] += 1
                continue
            words = [CRITIQUE, *self.words(row["text"])]
            ids, domains = request["input_ids"], request["domain_ids"]
            domain = self.builder.vocab.service_index(row["service"])
            self.counts[f"{split}_requests"] += 1
            yield {
                **request,
                "input_ids": ids[:-1] + words + ids[-1:],
                "domain_ids": domains[:-1] + [domain] * len(words) + domains[-1:],
                "prev_item": row["prev_item"],
                "critique": row["text"],
                "types": list(row["types"]),
                "family": row["family"],
                "held_out": bool(row["held_out"]),
            }


def without_critique(input_ids: Sequence[int], domain_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """A critique request's tokens with ``[CRITIQUE]`` and its words left out (the asked service
    stays): the plain request of the same target."""
    ids = list(input_ids)
    if CRITIQUE not in ids:
        return ids, list(domain_ids)
    start = ids.index(CRITIQUE)
    return ids[:start] + ids[-1:], list(domain_ids[:start]) + list(domain_ids[-1:])
