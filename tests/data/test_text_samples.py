"""Critique and narrative samples: tokens and labels against a hand-built expectation, the
request against the plain request of the same target, the per-user cap and unmatched rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_rec.data.positions import item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, Event, SequenceBuilder, SequenceConfig, TextSampleConfig
from moe_rec.data.text_samples import (
    TextSampleBuilder,
    distractor_for,
    drop_critique_words,
    read_distractors,
    without_critique,
)
from moe_rec.data.text_tokenizer import TextTokenizer, train_tokenizer
from moe_rec.data.vocab import BOS, CRITIQUE, EOS, EXPLAIN, Vocabulary

TEXTS = ["anything cheaper?", "a budget pick in lotions", "you like lotions"] * 30
CODES = {("a", f"i{k}"): (k % 4, (k + 1) % 4, k % 2) for k in range(6)} | {("b", "j0"): (3, 3, 1)}
EVENTS = [Event("a", f"i{k}", None, k, split) for k, split in enumerate(["train"] * 4 + ["valid", "test"])]
EVENTS.append(Event("b", "j0", None, 0, "train"))


def _builders(order: str = "interleave", **text: object) -> tuple[SequenceBuilder, TextSampleBuilder]:
    tokenizer = train_tokenizer(TEXTS, 300)
    vocab = Vocabulary(services=("a", "b"), levels=2, codebook_size=4, dedup_size=2, text_size=tokenizer.size)
    cfg = SequenceConfig(max_events=50, text=TextSampleConfig(**text), order=order)
    plain = SequenceBuilder(vocab, CODES, cfg)
    return plain, TextSampleBuilder(plain, tokenizer, cfg.text)


def _row(position: int, split: str, text: str = "anything cheaper?") -> dict:
    return {"user": "u", "service": "a", "position": position, "split": split, "prev_item": f"i{position - 1}",
            "target_item": f"i{position}", "text": text, "types": ["price"], "clauses": ["cheaper"],
            "family": "plain", "held_out": False}  # fmt: skip


def test_critique_sample_labels_only_its_target() -> None:
    plain, text = _builders(critiques_per_user=1)
    vocab = plain.vocab
    rows = [_row(2, "train"), _row(3, "train")]  # the cap keeps the latest: target i3
    (sample,) = text.train_samples("u", EVENTS, rows, [])
    words = [vocab.text_offset + i for i in text.tokenizer.encode("anything cheaper?")]
    unified = [e for e in EVENTS if e.split == "train"]  # a: 0..3 then b's one event, by progress
    history = [e for e in unified[: unified.index(EVENTS[3])]]
    expected = [BOS]
    for e in history:
        expected += vocab.item_tokens(e.service, CODES[(e.service, e.item_id)])
    target = vocab.item_tokens("a", CODES[("a", "i3")])
    assert sample["input_ids"] == expected + [CRITIQUE, *words, *target]
    assert sample["labels"] == [IGNORE_INDEX] * (len(expected) + 1 + len(words) + 1) + target[1:]
    batch = item_batch([sample], vocab, 8)
    labelled = (batch["labels"][0, :, 0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert labelled == [
        len(history) + 1 + len(words) + 1
    ]  # [BOS], history, [CRITIQUE], words: then the target
    assert (batch["text_labels"] == IGNORE_INDEX).all()  # a critique is read, not written
    assert text.counts["critique_samples"] == 1


def test_asked_last_puts_the_other_services_before_a_critique_samples_history() -> None:
    plain, text = _builders("asked_last", critiques_per_user=1)
    vocab = plain.vocab
    (sample,) = text.train_samples("u", EVENTS, [_row(3, "train")], [])
    expected = [BOS]
    for e in [EVENTS[6], *EVENTS[:3]]:  # b's j0 (by progress after i3), then a's i0 i1 i2
        expected += vocab.item_tokens(e.service, CODES[(e.service, e.item_id)])
    assert sample["input_ids"][: len(expected)] == expected
    assert sample["input_ids"][len(expected)] == CRITIQUE


def test_narrative_sample_writes_its_words_and_eos() -> None:
    plain, text = _builders(narratives_per_user=1)
    vocab = plain.vocab
    narrative = {"user": "u", "service": "a", "position": 1, "split": "train", "target_item": "i1",
                 "text": "you like lotions"}  # fmt: skip
    (sample,) = text.train_samples("u", EVENTS, [], [narrative])
    words = text.tokenizer.encode("you like lotions")
    batch = item_batch([sample], vocab, 8)
    n = 1 + 1 + 1 + 1  # [BOS], i0, the target i1, [EXPLAIN]
    assert batch["text_labels"][0, n : n + len(words) + 1].tolist() == [*words, vocab.text_size]
    assert (batch["text_labels"][0, :n] == IGNORE_INDEX).all()
    assert sample["input_ids"][-1] == EOS and EXPLAIN in sample["input_ids"]
    assert (batch["labels"][0, :, 0] != IGNORE_INDEX).nonzero().flatten().tolist() == [2]  # the target


def test_request_is_the_plain_request_with_the_critique_before_the_asked_service() -> None:
    plain, text = _builders()
    (request,) = text.requests("u", EVENTS, [_row(5, "test"), _row(4, "valid")], "test")
    (reference,) = [r for r in plain.eval_samples("u", EVENTS, "test") if r["target_item"] == "i5"]
    words = [CRITIQUE, *(plain.vocab.text_offset + i for i in text.tokenizer.encode("anything cheaper?"))]
    assert request["input_ids"] == reference["input_ids"][:-1] + words + reference["input_ids"][-1:]
    assert without_critique(request["input_ids"], request["domain_ids"]) == (
        reference["input_ids"],
        reference["domain_ids"],
    )
    assert request["target"] == reference["target"] and request["prev_item"] == "i4"


def test_rows_that_match_no_event_are_counted_not_dropped_silently() -> None:
    _, text = _builders()
    stale = {**_row(2, "train"), "target_item": "i9"}
    assert list(text.train_samples("u", EVENTS, [stale], [])) == []
    assert text.counts["critique_not_in_history"] == 1
    assert list(text.requests("u", EVENTS, [{**_row(5, "test"), "target_item": "i9"}], "test")) == []
    assert text.counts["request_not_in_split"] == 1


def test_a_critique_sample_ends_with_its_targets_narrative_when_there_is_one() -> None:
    plain, text = _builders(critiques_per_user=1, narratives_per_user=0)
    narrative = {"user": "u", "service": "a", "position": 3, "split": "train", "target_item": "i3",
                 "text": "you like lotions"}  # fmt: skip
    (sample,) = text.train_samples("u", EVENTS, [_row(3, "train")], [narrative])
    words = [plain.vocab.text_offset + i for i in text.tokenizer.encode("you like lotions")]
    assert sample["input_ids"][-len(words) - 2 :] == [EXPLAIN, *words, EOS]
    batch = item_batch([sample], plain.vocab, 8)
    assert batch["text_labels"][0, -len(words) - 1 :].tolist() == [
        w - plain.vocab.text_offset for w in words
    ] + [plain.vocab.text_size]
    assert text.counts["critique_samples_explained"] == 1


def test_held_out_users_and_cold_targets_get_no_training_sample() -> None:
    from moe_rec.data.cold_start import is_cold
    from moe_rec.data.holdout import is_held_out

    tokenizer = train_tokenizer(TEXTS, 300)
    vocab = Vocabulary(services=("a", "b"), levels=2, codebook_size=4, dedup_size=2, text_size=tokenizer.size)
    held = next(f"user{i}" for i in range(1000) if is_held_out(f"user{i}", 0.5))
    kept = next(f"user{i}" for i in range(1000) if not is_held_out(f"user{i}", 0.5))
    cfg = SequenceConfig(holdout_users=0.5)
    text = TextSampleBuilder(SequenceBuilder(vocab, CODES, cfg), tokenizer, cfg.text)
    rows = [{**_row(3, "train"), "user": u} for u in (held, kept)]
    assert list(text.train_samples(held, EVENTS, rows[:1], [])) == []
    assert len(list(text.train_samples(kept, EVENTS, rows[1:], []))) == 1

    share = next(s for s in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9) if is_cold("a", "i3", s))
    cfg = SequenceConfig(cold_items=share)
    text = TextSampleBuilder(SequenceBuilder(vocab, CODES, cfg), tokenizer, cfg.text)
    assert list(text.train_samples("u", EVENTS, [_row(3, "train")], [])) == []
    assert text.counts["critique_cold_target"] == 1


def _whitespace_words(tokenizer: TextTokenizer, text: str) -> list[list[int]]:
    """The critique's whitespace-separated words, each encoded on its own: the reference the
    word grouping of ``word_starts`` must match."""
    return [tokenizer.encode(word) for word in text.split()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_word_dropout_leaves_out_whole_words_at_its_rate(seed: int) -> None:
    plain, text = _builders(critiques_per_user=1)
    vocab, tokenizer = plain.vocab, text.tokenizer
    critique = "I'd rather have keratinous argan-oil, not lotions!"
    (sample,) = text.train_samples("u", EVENTS, [_row(3, "train", critique)], [])
    words = _whitespace_words(tokenizer, critique)
    assert sum(words, []) == tokenizer.encode(critique) and any(len(w) > 1 for w in words)
    start = sample["input_ids"].index(CRITIQUE) + 1
    head, tail = sample["input_ids"][:start], sample["input_ids"][start + len(tokenizer.encode(critique)) :]
    rng, p, draws = np.random.default_rng(seed), 0.3, 400
    dropped = np.zeros((draws, len(words)), dtype=bool)
    for d in range(draws):
        out = drop_critique_words(sample, p, tokenizer.word_starts(), vocab.text_offset, rng)
        ids = out["input_ids"]
        assert ids[:start] == head and ids[len(ids) - len(tail) :] == tail  # only the critique shrinks
        kept, at = ids[start : len(ids) - len(tail)], 0
        for j, w in enumerate(words):  # the kept subwords are whole words, in order
            if [i - vocab.text_offset for i in kept[at : at + len(w)]] == w:
                at += len(w)
            else:
                dropped[d, j] = True
        assert at == len(kept) > 0
        for key in ("domain_ids", "labels"):  # every column loses the same positions
            assert len(out[key]) == len(ids)
        assert out["labels"][len(ids) - len(tail) :] == sample["labels"][len(sample["labels"]) - len(tail) :]
    assert np.all(np.abs(dropped.mean(0) - p) < 0.1), dropped.mean(0)
    # each word is drawn on its own: neighbours part in about 2p(1 - p) = .42 of the draws
    assert np.all((dropped[:, 1:] != dropped[:, :-1]).mean(0) > 0.25)


def test_word_dropout_keeps_a_word_and_leaves_other_rows_alone() -> None:
    plain, text = _builders(critiques_per_user=1, narratives_per_user=1)
    offset, starts = plain.vocab.text_offset, text.tokenizer.word_starts()
    (sample,) = text.train_samples("u", EVENTS, [_row(3, "train", "anything cheaper?")], [])
    narrative = {"user": "u", "service": "a", "position": 3, "split": "train", "target_item": "i3",
                 "text": "you like lotions"}  # fmt: skip
    (explained,) = text.train_samples("u", EVENTS, [], [narrative])
    rng = np.random.default_rng(0)
    assert drop_critique_words(explained, 0.9, starts, offset, rng) == explained  # no [CRITIQUE]
    assert drop_critique_words(sample, 0.0, starts, offset, rng) == sample
    n = len(text.tokenizer.encode("anything cheaper?"))
    for _ in range(50):  # p near 1 still keeps one word of the three
        assert len(sample["input_ids"]) - n < len(
            drop_critique_words(sample, 0.999, starts, offset, rng)["input_ids"]
        )


def test_distractors_go_before_training_critiques_only_and_never_cut_the_critique(tmp_path: Path) -> None:
    pool = tmp_path / "small-talk.txt"
    pool.write_text("hello there\n\n  thanks a lot  \n")
    critique = "anything cheaper?"
    rows = [_row(3, "train", critique), _row(4, "valid", critique)]
    _, bare = _builders(critiques_per_user=1)
    plain, text = _builders(critiques_per_user=1, distractors=str(pool), distractor_share=1.0)
    (sample,) = text.train_samples("u", EVENTS, rows, [])
    (undistracted,) = bare.train_samples("u", EVENTS, rows, [])
    start = sample["input_ids"].index(CRITIQUE) + 1
    words = [plain.vocab.text_offset + i for i in text.tokenizer.encode(critique)]
    lead = sample["input_ids"][start : len(sample["input_ids"]) - len(undistracted["input_ids"]) + start]
    assert text.tokenizer.decode(i - plain.vocab.text_offset for i in lead) in {"hello there", "thanks a lot"}
    assert sample["input_ids"][start + len(lead) : start + len(lead) + len(words)] == words
    assert text.counts["critique_samples_distracted"] == 1
    # requests are read as users type them: no distractor
    assert list(text.requests("u", EVENTS, rows, "valid")) == list(bare.requests("u", EVENTS, rows, "valid"))
    # a tight cap cuts the distractor, never the critique
    _, tight = _builders(
        critiques_per_user=1, distractors=str(pool), distractor_share=1.0, max_text_tokens=len(words) + 1
    )
    (cut,) = tight.train_samples("u", EVENTS, rows, [])
    i = cut["input_ids"].index(CRITIQUE) + 1
    assert cut["input_ids"][i + 1 : i + 1 + len(words)] == words
    _, none = _builders(critiques_per_user=1, distractors=str(pool), distractor_share=0.0)
    assert list(none.train_samples("u", EVENTS, rows, [])) == [undistracted]
    # after the critique: its words first, then the sentence, then the asked service as before
    _, late = _builders(
        critiques_per_user=1, distractors=str(pool), distractor_share=1.0, distractor_place="after"
    )
    (after,) = late.train_samples("u", EVENTS, rows, [])
    extra, end = len(after["input_ids"]) - len(undistracted["input_ids"]), start + len(words)
    assert after["input_ids"][start:end] == words
    talk = after["input_ids"][end : end + extra]
    assert late.tokenizer.decode(i - plain.vocab.text_offset for i in talk) in {"hello there", "thanks a lot"}
    assert after["input_ids"][end + extra :] == undistracted["input_ids"][end:]


def test_distractor_share_and_bad_pools(tmp_path: Path) -> None:
    pool = [f"s{k}" for k in range(7)]
    picks = [distractor_for(f"u{k}", "a", k % 13, pool, 0.3) for k in range(4000)]
    assert abs(sum(p is not None for p in picks) / 4000 - 0.3) < 0.03
    assert {p[0] for p in picks if p} == set(pool)  # every sentence gets used
    assert not any(p[1] for p in picks if p)  # "before" by default
    assert picks == [distractor_for(f"u{k}", "a", k % 13, pool, 0.3) for k in range(4000)]  # a rebuild agrees
    either = [distractor_for(f"u{k}", "a", k % 13, pool, 0.3, "either") for k in range(4000)]
    assert [p is None for p in either] == [p is None for p in picks]  # the place moves no critique in or out
    assert abs(sum(p[1] for p in either if p) / sum(p is not None for p in either) - 0.5) < 0.05
    assert {p[0] for p in either if p and p[1]} == {p[0] for p in either if p and not p[1]} == set(pool)
    assert all(p[1] for p in (distractor_for(f"u{k}", "a", 1, pool, 1.0, "after") for k in range(50)))
    with pytest.raises(ValueError, match="distractor_place must be one of before, after, either"):
        TextSampleConfig(distractor_place="middle")
    with pytest.raises(DataError, match="sequences.text.distractors: cannot read"):
        read_distractors(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="holds no sentence"):
        read_distractors(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="distractor_share"):
        TextSampleConfig(distractor_share=1.5)
