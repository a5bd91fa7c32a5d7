"""Narrative consistency and diversity against plain loops over hand-made vectors and texts."""

from __future__ import annotations

import math

import pytest
import torch

from moe_rec.eval.narrative_metrics import consistency, diversity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consistency_is_mrr_and_hit_of_a_plain_ranking(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(30, 8, generator=g, dtype=torch.float64)
    narratives = torch.randn(5, 8, generator=g, dtype=torch.float64)
    emitted = [3, 17, 25, 0, 12]
    candidates = [
        torch.arange(0, 20),
        torch.arange(10, 30),
        torch.arange(15, 30),
        torch.arange(0, 30),
        torch.arange(5, 15),
    ]
    got = consistency(narratives, items, emitted, candidates)
    mrr = hit = 0.0
    for q, item, rows in zip(narratives, emitted, candidates, strict=True):
        cos = {int(r): float(items[r] @ q / (items[r].norm() * q.norm())) for r in rows}
        rank = 1 + sum(1 for r, c in cos.items() if c > cos[item])
        mrr, hit = mrr + 1 / rank, hit + (rank <= 10)
    assert got["mrr"] == pytest.approx(mrr / 5, rel=1e-5) and got["hit@10"] == pytest.approx(hit / 5)
    same = consistency(items[emitted], items, emitted, candidates)  # a narrative equal to its item's text
    assert same["mrr"] == pytest.approx(1.0)


def test_diversity_counts_distinct_ngrams_and_exact_repeats() -> None:
    texts = ["a b c", "a b d", "a b c"]
    got = diversity(texts)
    assert got["distinct-1"] == pytest.approx(4 / 9)  # a b c d of 9 words
    assert got["distinct-2"] == pytest.approx(3 / 6)  # (a b) (b c) (b d) of 6 bigrams
    assert got["repeated"] == pytest.approx(2 / 3)
    assert math.isclose(diversity([])["distinct-1"], 0.0)


def test_mentions_are_whole_words_and_the_longest_phrase() -> None:
    from moe_rec.eval.narrative_metrics import mentions

    text = "A budget pick in Baby Food by Willow-field, with newborn care."
    assert mentions(text, {"baby food", "food", "willow field", "field", "bbq", "new"}) == {
        "baby food",
        "willow field",
    }
    assert mentions("", {"a"}) == set()


def test_faithfulness_counts_right_and_covered_values_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import faithfulness

    vocab = {"brand": {"nivea", "dove"}, "category": {"lotions", "soap"}, "band": {"budget", "premium"}}
    texts = ["a budget pick in lotions by dove", "premium soap"]
    facts = [
        {"brand": "Dove", "category": "Lotions", "band": "premium"},
        {"brand": None, "category": "soap", "band": "premium"},
    ]
    got = faithfulness(texts, facts, [vocab, vocab])
    # named: budget, lotions, dove | premium, soap -> 5; right: lotions, dove, premium, soap -> 4
    # known: 3 + 2 = 5 values; covered: lotions, dove, premium, soap -> 4
    assert got == {"precision": 4 / 5, "coverage": 4 / 5, "mentions": 5 / 2}
