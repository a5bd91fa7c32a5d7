"""Critique and narrative samples for the item-level model (LUMEN, REGEN arXiv 2503.11924): one
sequence holds a history, optionally a critique in words, the item, and the item's narrative.

Built by the sequences stage from the critiques stage's rows (:mod:`moe_rec.data.critiques`,
:mod:`moe_rec.data.narratives`) and the subword tokenizer (:mod:`moe_rec.data.text_tokenizer`):

* **critique -> item** (train): ``[BOS] history [CRITIQUE] words target``. Only the target is a
  label: the history is trained by the plain windows already, and a critique sample would
  otherwise weigh its history twice. With ``distractors`` (a file of sentences that ask for
  nothing), a share of them read one such sentence before the critique's words (or after them,
  with ``distractor_place``; :func:`distractor_for`), so a model learns to read past small talk.
* **item -> narrative** (train): ``[BOS] history target [EXPLAIN] words [EOS]``: the target is a
  label (predicted from the history), and the words and ``[EOS]`` are text labels. A critique
  sample whose target has a narrative ends with it too, as a request with both a critique and
  ``explain`` reads.
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

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from moe_rec.console import progress
from moe_rec.data import store
from moe_rec.data.cold_start import is_cold
from moe_rec.data.critiques import load_rows
from moe_rec.data.holdout import is_held_out
from moe_rec.data.schema import EVENT_SCHEMA, DataError
from moe_rec.data.sequences import (
    IGNORE_INDEX,
    SAMPLE_FEATURES,
    Event,
    SequenceBuilder,
    TextSampleConfig,
    asked_last,
    iter_users,
)
from moe_rec.data.text_tokenizer import TextTokenizer, train_tokenizer
from moe_rec.data.vocab import CRITIQUE, EOS, EXPLAIN, Vocabulary

CRITIQUE_SPLITS = {"valid": "critique_valid", "test": "critique_test"}
REQUEST_FEATURES = datasets.Features(
    {
        **SAMPLE_FEATURES["test"],
        "prev_item": datasets.Value("string"),
        "critique": datasets.Value("string"),
        "types": datasets.Sequence(datasets.Value("string")),
        "clauses": datasets.Sequence(datasets.Value("string")),
        "family": datasets.Value("string"),
        "held_out": datasets.Value("bool"),
    }
)


def read_distractors(path: str | Path) -> list[str]:
    """``sequences.text.distractors``: the file's non-empty lines, stripped; a missing or empty
    file is a :class:`DataError` naming the key."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"sequences.text.distractors: cannot read {path} ({e})") from None
    found = [line for line in lines if line]
    if not found:
        raise DataError(f"sequences.text.distractors: {path} holds no sentence")
    return found


def distractor_for(
    user: str, service: str, position: int, pool: Sequence[str], share: float, place: str = "before"
) -> tuple[str, bool] | None:
    """The sentence put beside one training critique's words and whether it goes after them, or
    None (a share ``share`` of the critiques get one): a hash of the critique's (user, service,
    position), so a rebuild agrees. ``place``: "before", "after", or "either" (half each, by the hash)."""
    digest = int.from_bytes(
        hashlib.blake2b(f"distractor\t{user}\t{service}\t{position}".encode(), digest_size=8).digest()
    )
    if (digest % 1_000_000) / 1_000_000 >= share:
        return None
    rest = digest // 1_000_000
    after = place == "after" or (place == "either" and rest % 2 == 1)
    return pool[(rest // 2) % len(pool)], after


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
        self.distractors = read_distractors(cfg.distractors) if cfg.distractors else []
        self.counts: Counter[str] = Counter()

    def words(self, text: str) -> list[int]:
        """Vocabulary ids of ``text``'s subwords, cut at ``max_text_tokens`` (cuts counted)."""
        ids = self.tokenizer.encode(text)
        if len(ids) > self.cfg.max_text_tokens:
            self.counts["text_cut"] += 1
            ids = ids[: self.cfg.max_text_tokens]
        return [self.builder.vocab.text_offset + i for i in ids]

    def _train_prefix(self, ordered: list[Event], target: Event) -> list[Event]:
        """The training events before ``target`` in the unified history (with ``order:
        asked_last``: every other service's, then the target service's before it), the most recent
        ``max_events - 1`` (the target takes the last slot)."""
        cfg = self.builder.cfg
        if cfg.order == "asked_last":  # every other service's events, then the target service's before it
            candidates = [e for e in ordered if e.service != target.service or e.position < target.position]
        else:
            candidates = ordered[: ordered.index(target)]
        before = [
            e for e in candidates if e.split == "train" and not is_cold(e.service, e.item_id, cfg.cold_items)
        ]
        if cfg.order == "asked_last":
            before = asked_last(before, [e.service for e in before], target.service)
        return before[-(cfg.max_events - 1) :] if cfg.max_events > 1 else []

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
        """The target event's tokens: its service token, then its codes."""
        return self.builder.vocab.item_tokens(target.service, self.builder.event_codes(target))

    def train_samples(
        self, user: str, events: Sequence[Event], critiques: Sequence[dict], narratives: Sequence[dict]
    ) -> Iterator[dict[str, Any]]:
        """The user's latest training critique and narrative rows as samples (module docstring);
        none for a user held out of training, none whose target is a cold item (as the plain
        windows leave them out)."""
        if is_held_out(user, self.builder.cfg.holdout_users):
            return
        ordered = self.builder.ordered(user, events)
        by_key = {(e.service, e.position): e for e in ordered}
        explained = {(r["service"], r["position"]): r["text"] for r in narratives if r["split"] == "train"}
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
                if is_cold(target.service, target.item_id, self.builder.cfg.cold_items):
                    self.counts[f"{kind}_cold_target"] += 1
                    continue
                history, item = self._train_prefix(ordered, target), self._target_tokens(target)
                service_token, codes = item[:1], item[1:]
                if kind == "critique":
                    words = self.words(row["text"])
                    extra = (
                        distractor_for(user, row["service"], row["position"], self.distractors,
                                       self.cfg.distractor_share, self.cfg.distractor_place)
                        if self.distractors else None
                    )  # fmt: skip
                    if extra is not None:  # beside the critique, cut to fit, never the critique
                        room = max(0, self.cfg.max_text_tokens - len(words))
                        offset = self.builder.vocab.text_offset
                        small_talk = [offset + i for i in self.tokenizer.encode(extra[0])[:room]]
                        words = words + small_talk if extra[1] else small_talk + words
                        self.counts["critique_samples_distracted"] += 1
                    tail = [
                        ([CRITIQUE, *words], False),
                        (service_token, False),
                        (codes, True),
                    ]
                    narrative = explained.get((row["service"], row["position"]))
                    if narrative is not None:  # the target's narrative after it, as serving asks for both
                        tail += [([EXPLAIN], False), ([*self.words(narrative), EOS], True)]
                        self.counts["critique_samples_explained"] += 1
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
                "clauses": list(row["clauses"]),
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


def plain_request(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` (``input_ids``, ``domain_ids``, ...) without its critique (:func:`without_critique`),
    every other field kept."""
    ids, domains = without_critique(request["input_ids"], request["domain_ids"])
    return {**request, "input_ids": ids, "domain_ids": domains}


def drop_critique_words(
    row: dict[str, Any], p: float, word_starts: np.ndarray, text_offset: int, rng: np.random.Generator
) -> dict[str, Any]:
    """A critique sample (``[CRITIQUE] words target ...``) with each word of its critique left out
    with probability ``p`` (at least one word kept), so a model leans on every word it reads rather
    than on one carrier phrase; ``input_ids``, ``domain_ids`` and token ``labels`` shortened alike.
    A word is a subword ``word_starts`` marks (indexed by tokenizer id, ``vocab id - text_offset``)
    and the continuation subwords after it. Rows without ``[CRITIQUE]`` are returned as they are."""
    ids = row["input_ids"]
    if CRITIQUE not in ids:
        return row
    first = ids.index(CRITIQUE) + 1
    stop = first
    while stop < len(ids) and text_offset <= ids[stop] < text_offset + len(word_starts):
        stop += 1
    span = np.asarray(ids[first:stop]) - text_offset
    word = np.cumsum(word_starts[span] | (np.arange(len(span)) == 0)) - 1  # each subword's word
    n_words = int(word[-1]) + 1 if len(span) else 0
    if n_words < 2:
        return row
    dropped = rng.random(n_words) < p
    if dropped.all():
        dropped[rng.integers(n_words)] = False
    keep = np.ones(len(ids), dtype=bool)
    keep[first:stop] = ~dropped[word]
    return {**row, **{k: [v for v, kept in zip(row[k], keep, strict=True) if kept]
                      for k in ("input_ids", "domain_ids", "labels") if k in row}}  # fmt: skip


def _by_user(rows: datasets.Dataset, columns: Sequence[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows.select_columns(list(columns)).to_list():
        out[row["user"]].append(row)
    return out


def write_text_samples(
    data_dir: Path, builder: SequenceBuilder, critiques_dir: Path, narratives_dir: Path | None, out_dir: Path
) -> tuple[Vocabulary, dict[str, int]]:
    """Train the tokenizer on the run's text (item titles, training critiques and narratives), then
    write the critique and narrative training samples (``<out_dir>/train/part-text-*.parquet``, read
    with the plain ones) and the critique requests (``<out_dir>/critique_{valid,test}``); returns
    the vocabulary with its text tokens and the counts (samples, cuts, rows that matched nothing).
    ``narratives_dir`` None: critiques only."""
    cfg = builder.cfg.text
    critiques = {split: load_rows(critiques_dir, split) for split in ("train", "valid", "test")}
    narratives = load_rows(narratives_dir, "train") if narratives_dir is not None else None
    titles = [t for t in store.load_items(data_dir)["title"] if t]
    texts = [*titles, *critiques["train"]["text"], *(narratives["text"] if narratives is not None else [])]
    texts += read_distractors(cfg.distractors) if cfg.distractors else []
    tokenizer = train_tokenizer(texts, cfg.tokenizer_size)
    tokenizer.save(out_dir)
    vocab = replace(builder.vocab, text_size=tokenizer.size)
    text = TextSampleBuilder(SequenceBuilder(vocab, builder.item_codes, builder.cfg), tokenizer, cfg)
    columns = ["user", "service", "position", "split", "prev_item", "target_item", "text", "types", "clauses",
               "family", "held_out"]  # fmt: skip
    crit_rows = {split: _by_user(rows, columns) for split, rows in critiques.items()}
    narr_rows = (
        _by_user(narratives, ["user", "service", "position", "split", "target_item", "text"])
        if narratives is not None
        else {}
    )
    outputs = {"train": ("train", "part-text-{:05d}.parquet", SAMPLE_FEATURES["train"])}
    outputs |= {
        split: (name, "part-{:05d}.parquet", REQUEST_FEATURES) for split, name in CRITIQUE_SPLITS.items()
    }
    for name, pattern, _ in outputs.values():
        for old in (Path(out_dir) / name).glob(pattern.replace("{:05d}", "*")):
            old.unlink()
    counts: Counter[str] = Counter()
    shards = store.event_shard_paths(data_dir)
    with progress() as bar:
        task = bar.add_task("critique and narrative samples", total=len(shards))
        for i, shard in enumerate(shards):
            found: dict[str, list[dict]] = defaultdict(list)
            for user, events in iter_users(pq.read_table(shard, schema=EVENT_SCHEMA)):
                train = crit_rows["train"].get(user, [])
                found["train"] += text.train_samples(user, events, train, narr_rows.get(user, []))
                for split in CRITIQUE_SPLITS:
                    found[split] += text.requests(user, events, crit_rows[split].get(user, []), split)
            for split, rows in found.items():
                name, pattern, features = outputs[split]
                counts[name if split != "train" else "text_train"] += len(rows)
                if rows:
                    path = Path(out_dir) / name / pattern.format(i)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
            bar.advance(task)
    return vocab, {**counts, **text.counts}
