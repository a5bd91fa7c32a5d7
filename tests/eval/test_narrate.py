"""Greedy narrative decoding's repetition rule against a brute force over every n-gram."""

from __future__ import annotations

import random

import pytest

from moe_rec.eval.narrate import repeated


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_repeated_bans_exactly_what_would_repeat_an_ngram(seed: int, n: int) -> None:
    rng = random.Random(seed)
    text = [rng.randrange(4) for _ in range(rng.randrange(12))]
    grams = {tuple(text[i : i + n]) for i in range(len(text) - n + 1)}
    expected = {
        t for t in range(4) if len(text) >= n - 1 and tuple([*text[len(text) - n + 1 :], t][-n:]) in grams
    }
    assert repeated(text, n) == expected
    assert repeated(text, 0) == set()
