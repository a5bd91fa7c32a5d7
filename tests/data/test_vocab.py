"""Vocabulary layout: disjoint ranges, item round trip, names."""

import random

import pytest

from moe_rec.data.vocab import SPECIAL_TOKENS, Vocabulary


def test_ranges_are_contiguous_and_disjoint() -> None:
    v = Vocabulary(("a", "b", "c"), levels=3, codebook_size=16, dedup_size=5, service_slots=8)
    assert v.service_offset == len(SPECIAL_TOKENS)
    assert v.code_offset == v.service_offset + 8
    assert v.dedup_offset == v.code_offset + 3 * 16
    assert v.size == v.dedup_offset + 5
    names = [v.token_name(t) for t in range(v.size)]
    assert len(set(names)) == v.size  # every token has its own name
    with pytest.raises(ValueError):
        v.token_name(v.size)


def test_item_tokens_round_trip_random() -> None:
    rng = random.Random(0)
    v = Vocabulary(("grocery", "marketplace"), levels=4, codebook_size=7, dedup_size=3)
    for _ in range(200):
        service = rng.choice(v.services)
        codes = tuple(rng.randrange(7) for _ in range(4)) + (rng.randrange(3),)
        tokens = v.item_tokens(service, codes)
        assert len(tokens) == v.tokens_per_item
        assert v.decode_item(tokens) == (service, codes)
        # level l token lies in that level's own range
        for depth, t in enumerate(tokens[1:]):
            lo, hi = v.code_token_range(depth)
            assert lo <= t < hi


def test_bad_codes_and_services_are_rejected() -> None:
    v = Vocabulary(("a",), levels=2, codebook_size=4, dedup_size=2)
    with pytest.raises(ValueError, match="outside"):
        v.item_tokens("a", (4, 0, 0))
    with pytest.raises(ValueError, match="dedup"):
        v.item_tokens("a", (0, 0, 2))
    with pytest.raises(KeyError, match="unknown service"):
        v.item_tokens("zzz", (0, 0, 0))
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(("a", "a"), levels=1, codebook_size=2, dedup_size=1)
    assert Vocabulary.from_dict(v.to_dict()) == v


def test_text_tokens_follow_the_item_tokens() -> None:
    plain = Vocabulary(services=("a", "b"), levels=2, codebook_size=4, dedup_size=3)
    v = Vocabulary(services=("a", "b"), levels=2, codebook_size=4, dedup_size=3, text_size=10)
    assert v.text_offset == plain.size and v.size == plain.size + 10
    assert not v.is_text(v.text_offset - 1) and v.is_text(v.text_offset) and not v.is_text(v.size)
    assert v.token_name(v.text_offset + 4) == "[text:4]" and v.token_name(v.text_offset - 1) == "[dedup:2]"
    assert Vocabulary.from_dict(v.to_dict()) == v
    assert Vocabulary.from_dict({k: x for k, x in v.to_dict().items() if k != "text_size"}) == plain
