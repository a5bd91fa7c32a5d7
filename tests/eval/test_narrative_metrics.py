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
    # the first user bought a budget item before: "budget" is grounded in the history, not made up
    history = [{"brand": {"Nivea"}, "category": set(), "band": {"budget"}}, {"brand": {"dove"}}]
    got = faithfulness(texts, facts, [vocab, vocab], history)
    assert got == {"precision": 4 / 5, "coverage": 4 / 5, "mentions": 5 / 2, "grounded": 5 / 5}
    texts[1] = "premium soap by nivea"  # nivea: neither the second item's brand nor its user's
    got = faithfulness(texts, facts, [vocab, vocab], history)
    assert got["precision"] == 4 / 6 and got["grounded"] == 5 / 6


def test_personalisation_counts_wins_against_other_users_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import personalisation

    histories = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    narratives = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    # request 0 (user a): own cos 1 against user b's history 0 -> 1 of 1 (request 1 is a's too)
    # request 1 (user a): own cos 0 against b's 1 -> 0 of 1
    # request 2 (user b): own cos 1 against a's two histories, 0 and 0 -> 2 of 2
    assert personalisation(narratives, histories, ["a", "a", "b"]) == pytest.approx((1 + 0 + 1) / 3)
    # a narrative half-way between its own and another's history is a tie: half a win
    tie = personalisation(
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["a", "b"]
    )
    assert tie == pytest.approx((0.5 + 0.0) / 2)  # request 1: own cos 0 against a's 1
    assert math.isnan(personalisation(narratives[:1], histories[:1], ["a"]))
    # within groups: request 2 (group y) has no other user in its group, and requests 0 and 1
    # (user a, group x) only each other's (same) user: nothing to compare, NaN; with a third user
    # in group x, request 0 wins against it (cos 1 > 0) and request 1 loses (0 < 1)
    assert math.isnan(personalisation(narratives, histories, ["a", "a", "b"], ["x", "x", "y"]))
    four_n, four_h = torch.cat([narratives, narratives[:1]]), torch.cat([histories, histories[2:]])
    got = personalisation(four_n, four_h, ["a", "a", "b", "c"], ["x", "x", "y", "x"])
    # request 3 (user c, group x): narrative (1, 0), own history (0, 1): cos 0 against a's two
    # histories at cos 1: 0 of 2
    assert got == pytest.approx((1 + 0 + 0) / 3)


def test_words_split_punctuation_and_lower_case() -> None:
    from moe_rec.eval.narrative_metrics import words

    assert words("Why: it's NEW, 2-pack.") == ["why", ":", "it", "'", "s", "new", ",", "2", "-", "pack", "."]


def test_corpus_bleu_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import corpus_bleu

    hyps = [["the", "cat", "sat", "on", "the", "mat"], list("abcde")]
    refs = [["the", "cat", "is", "on", "the", "mat"], list("abcdefg")]
    got = corpus_bleu(hyps, refs)
    # matches / n-grams, summed over both pairs:
    # 1: (the 2, cat, on, mat = 5) + 5 of (6 + 5); 2: (the cat, on the, the mat) + 4 of (5 + 4)
    # 3: (on the mat) + 3 of (4 + 3); 4: 0 + 2 of (3 + 2); c = 11 words against r = 13
    assert [got[f"p{n}"] for n in (1, 2, 3, 4)] == pytest.approx([10 / 11, 7 / 9, 4 / 7, 2 / 5])
    assert got["bp"] == pytest.approx(math.exp(1 - 13 / 11)) and got["ratio"] == pytest.approx(11 / 13)
    assert got["bleu"] == pytest.approx(math.exp(1 - 13 / 11) * (16 / 99) ** 0.25)
    # clipping: "the" four times is matched only as often as the reference has it
    clipped = corpus_bleu([["the"] * 4], [["the", "cat"]], max_n=1)
    assert clipped["p1"] == pytest.approx(1 / 4) and clipped["bp"] == 1.0
    assert corpus_bleu([hyps[0]], [refs[0]])["bleu"] == 0.0  # no 4-gram in common, no smoothing
    assert corpus_bleu([refs[1]], [refs[1]])["bleu"] == pytest.approx(1.0)
    # a hypothesis shorter than n has no n-gram to count (NLTK's corpus_bleu counts one, unmatched)
    assert corpus_bleu([["a", "b"], list("abcd")], [["a", "b"], list("abcd")])["bleu"] == pytest.approx(1.0)


def test_bleu_agrees_with_nltk_where_it_is_installed() -> None:
    """Not a dependency: skipped unless NLTK is importable (``pip install --target`` elsewhere)."""
    import random

    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    from moe_rec.eval.narrative_metrics import corpus_bleu, self_bleu

    method1 = nltk_bleu.SmoothingFunction().method1
    for seed in range(50):
        rng = random.Random(seed)
        vocab = "abcdef"[: rng.randint(2, 6)]
        hyps = [[rng.choice(vocab) for _ in range(rng.randint(4, 14))] for _ in range(rng.randint(1, 6))]
        refs = [[rng.choice(vocab) for _ in range(rng.randint(1, 14))] for _ in hyps]
        assert corpus_bleu(hyps, refs)["bleu"] == pytest.approx(
            nltk_bleu.corpus_bleu([[r] for r in refs], hyps)
        )
        texts = hyps + refs
        expected = [
            nltk_bleu.sentence_bleu(texts[:i] + texts[i + 1 :], t, smoothing_function=method1)
            for i, t in enumerate(texts)
        ]
        assert self_bleu(texts) == pytest.approx(sum(expected) / len(expected))


def test_rouge_l_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import lcs_length, rouge_l

    assert lcs_length("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    assert rouge_l("the cat sat on the mat".split(), "the cat is on the mat".split()) == pytest.approx(5 / 6)
    # LCS "b d": precision 2 / 4, recall 2 / 3, F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4 / 7
    assert rouge_l(list("abcd"), list("bde")) == pytest.approx(4 / 7)
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (CLRS)
    assert rouge_l(["x"], ["y"]) == 0.0 and rouge_l([], ["y"]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lcs_length_matches_a_brute_force(seed: int) -> None:
    import itertools
    import random

    from moe_rec.eval.narrative_metrics import lcs_length

    rng = random.Random(seed)
    a, b = ([rng.choice("xyz") for _ in range(rng.randrange(8))] for _ in range(2))
    subsequences = {tuple(c) for k in range(len(a) + 1) for c in itertools.combinations(a, k)}
    expected = max(
        k for k in range(len(a) + 1) for c in itertools.combinations(b, k) if tuple(c) in subsequences
    )
    assert lcs_length(a, b) == expected


def test_self_bleu_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import self_bleu

    # two copies score 1 against each other; a text sharing no word with the others scores 0
    assert self_bleu([list("abcd"), list("abcd"), list("wxyz")]) == pytest.approx(2 / 3)
    # "a b c e" against "a b c d": p1 3/4, p2 2/3, p3 1/2, p4 0 -> 0.1 / 1 (smoothed); same lengths
    assert self_bleu([list("abce"), list("abcd")]) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25)
    # clipped by the largest count in any one other text, brevity against the closest length:
    # "a a" against "a b c" and "a x": p1 = 1/2, p2 = 0 -> 0.1 / 1, max_n 2; closest length 2 -> bp 1
    assert self_bleu([list("aa"), list("abc"), list("ax")], max_n=2)  # the first of three, below
    first = (1 / 2 * 0.1) ** 0.5
    # "a b c" against "a a", "a x": p1 1/3, p2 0 -> 0.1 / 2, closest length 2 (< 3: bp 1)
    second = (1 / 3 * 0.1 / 2) ** 0.5
    # "a x" against "a a", "a b c": p1 1/2, p2 0.1 / 1, closest length 2 -> bp 1
    third = (1 / 2 * 0.1) ** 0.5
    assert self_bleu([list("aa"), list("abc"), list("ax")], max_n=2) == pytest.approx(
        (first + second + third) / 3
    )
    # brevity: "a b" against "a b c d e" only: bp exp(1 - 5/2); the long one p2 1/4 etc.
    short = math.exp(1 - 5 / 2) * 1.0
    long = (2 / 5 * 1 / 4) ** 0.5  # p1 2/5, p2 1/4 (a b), longer than its reference: bp 1
    assert self_bleu([list("ab"), list("abcde")], max_n=2) == pytest.approx((short + long) / 2)
    assert math.isnan(self_bleu([list("ab")]))


def test_format_validity_counts_ended_nonempty_and_clean_by_hand() -> None:
    from moe_rec.eval.narrative_metrics import format_validity, leaks

    ids = {"m00062", "g00692"}
    assert leaks("a pick like m00062. [EOS] [c2:17]", ids) == ["[eos", "[c2", "m00062"]
    assert leaks("a budget pick [in] baby food, m000620", ids) == []
    texts = ["a pick in bbq.", "", "see m00062 now", "a pick \ufffd", "cut at the cap"]
    lengths = [5, 0, 4, 3, 8]  # the last reached the cap of 8: no [EOS]
    got = format_validity(lengths, texts, 8, ids)
    assert got == {"valid": 1 / 5, "ended": 4 / 5, "nonempty": 4 / 5, "clean": 3 / 5}


def test_against_references_is_corpus_bleu_and_mean_rouge_l_of_the_words() -> None:
    from moe_rec.eval.narrative_metrics import against_references

    got = against_references(
        ["The cat sat on the mat", "A B C D E"], ["the cat is on the mat", "a b c d e f g"]
    )
    # the pairs of test_corpus_bleu_by_hand, lower-cased; ROUGE-L 5/6 and 5/7 (P 1, R 5/7: F1 10/12)
    assert got["bleu"] == pytest.approx(math.exp(1 - 13 / 11) * (16 / 99) ** 0.25)
    assert got["rouge_l"] == pytest.approx((5 / 6 + 10 / 12) / 2)
