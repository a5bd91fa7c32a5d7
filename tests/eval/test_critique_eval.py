"""The critique evaluation's parts against hand-worked examples: what a critique asks, which
items satisfy it, the rule filter's order and the per-request gains."""

from __future__ import annotations

import math

import pytest

from moe_rec.data.item_attributes import Size
from moe_rec.eval.critiques import ItemFacts, _gains, asks, rule_filter, satisfied, with_named_terms

FACTS = ItemFacts(
    brand=["nivea", "dove", "nivea", None, "dove"],
    leaf=["lotions", "lotions", "soap", "lotions", "soap"],
    price=[10.0, 4.0, 3.0, None, 12.0],
)


def test_asks_read_the_record_and_the_target() -> None:
    request = {"types": ["brand", "price", "category"], "clauses": ["brand", "cheaper", "category"]}
    assert asks(request, target=2, prev=0, facts=FACTS) == {
        "brand": "nivea",
        "category": "soap",
        "price": ("<", 10.0),
    }
    pricier = {"types": ["price"], "clauses": ["pricier"]}
    assert asks(pricier, target=4, prev=1, facts=FACTS) == {"price": (">", 4.0)}
    assert asks(pricier, target=4, prev=3, facts=FACTS) == {}  # the previous item has no price
    assert asks({"types": ["size"], "clauses": ["bigger"]}, target=4, prev=1, facts=FACTS) == {}


def test_satisfied_and_the_rule_filter_keep_order_within_each_part() -> None:
    assert satisfied(2, "brand", "nivea", FACTS) and not satisfied(3, "brand", "nivea", FACTS)
    assert satisfied(1, "price", ("<", 10.0), FACTS) and not satisfied(3, "price", ("<", 10.0), FACTS)
    assert not satisfied(-1, "category", "soap", FACTS)
    wanted = {"category": "soap", "price": ("<", 10.0)}
    assert rule_filter([0, 4, 1, 2, 3], wanted, FACTS) == [2, 0, 4, 1, 3]  # only item 2 is cheap soap
    assert rule_filter([3, 1], {}, FACTS) == [3, 1]


# items 0..4 of FACTS with what terms, colour, size and pack critiques read
WORDS = ItemFacts(
    brand=FACTS.brand, leaf=FACTS.leaf, price=FACTS.price,
    words=[frozenset({"shea", "butter"}), frozenset({"shea"}), frozenset({"argan", "oil", "butter"}),
           frozenset(), frozenset({"argan", "butter"})],
    colour=["red", None, "black", "red", "black"],
    size=[Size("amount", 10.0), Size("amount", 12.0), Size("amount", 12.5), Size("count", 30.0), None],
    pack=[1, 6, 2, 1, 1],
    size_ratio=1.2,
)  # fmt: skip


def test_asks_reads_terms_colour_size_and_pack_as_the_builder_named_them() -> None:
    request = {"types": ["terms", "colour", "size", "pack"], "clauses": ["terms", "colour", "bigger", "bigger_pack"],
               "terms": ["argan", "butter"]}  # fmt: skip
    assert asks(request, target=2, prev=0, facts=WORDS) == {
        "terms": frozenset({"argan", "butter"}),
        "colour": "black",
        "size": (">", Size("amount", 10.0)),
        "pack": (">", 1),
    }
    smaller = {"types": ["size", "pack"], "clauses": ["smaller", "smaller_pack"], "terms": []}
    assert asks(smaller, target=0, prev=1, facts=WORDS) == {
        "size": ("<", Size("amount", 12.0)),
        "pack": ("<", 6),
    }
    assert asks(smaller, target=0, prev=4, facts=WORDS) == {"pack": ("<", 1)}  # item 4 states no size
    assert asks(request, target=2, prev=0, facts=FACTS) == {}  # facts without words, colours, sizes


def test_terms_colour_size_and_pack_satisfied_by_hand() -> None:
    both = frozenset({"argan", "butter"})
    assert [satisfied(r, "terms", both, WORDS) for r in range(5)] == [False, False, True, False, True]
    assert [satisfied(r, "colour", "black", WORDS) for r in range(5)] == [False, False, True, False, True]
    # bigger than 10 oz needs more than 12 oz (ratio 1.2): 12 is not, 12.5 is; a count never compares
    assert [satisfied(r, "size", (">", Size("amount", 10.0)), WORDS) for r in range(5)] == [
        False, False, True, False, False]  # fmt: skip
    # smaller than 12.5 oz needs under 12.5 / 1.2 = 10.42: 10 is, 12 is not
    assert [satisfied(r, "size", ("<", Size("amount", 12.5)), WORDS) for r in range(5)] == [
        True, False, False, False, False]  # fmt: skip
    assert [satisfied(r, "pack", (">", 1), WORDS) for r in range(5)] == [False, True, True, False, False]
    assert rule_filter([3, 1, 4, 0, 2], {"terms": both, "colour": "black"}, WORDS) == [4, 2, 3, 1, 0]


def test_requests_read_their_records_terms_and_count_the_ones_without() -> None:
    requests = [{"user": u, "service": "toys", "prev_item": p, "target_item": t, "types": ["terms"]}
                for u, p, t in (("u1", "a", "b"), ("u2", "a", "b"), ("u1", "b", "c"))]  # fmt: skip
    records = [{"user": "u2", "service": "toys", "prev_item": "a", "target_item": "b", "terms": ["wooden"]},
               {"user": "u1", "service": "toys", "prev_item": "a", "target_item": "b", "terms": ["magnetic"]},
               {"user": "u1", "service": "beauty", "prev_item": "b", "target_item": "c", "terms": ["argan"]}]  # fmt: skip
    named, missing = with_named_terms(requests, records)
    assert [r["terms"] for r in named] == [["magnetic"], ["wooden"], []] and missing == 1
    assert (
        named[0]["types"] == ["terms"] and "terms" not in requests[0]
    )  # the rest kept, the input left alone


def test_gains_are_recall_and_ndcg_of_one_target() -> None:
    assert _gains([5, 7, 9], 7, 10) == (1.0, 1.0 / math.log2(3))
    assert _gains([5, 7, 9], 9, 2) == (0.0, 0.0)


def test_a_filter_shallower_than_the_top_k_is_a_config_error() -> None:
    from moe_rec.eval.config import EvalConfig

    assert EvalConfig(filter_depth=10).filter_depth == 10
    with pytest.raises(ValueError, match="filter_depth=9"):
        EvalConfig(filter_depth=9)
