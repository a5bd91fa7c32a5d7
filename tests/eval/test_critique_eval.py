"""The critique evaluation's parts against hand-worked examples: what a critique asks, which
items satisfy it, the rule filter's order and the per-request gains."""

from __future__ import annotations

import math

import pytest

from moe_rec.eval.critiques import ItemFacts, _gains, asks, rule_filter, satisfied

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


def test_gains_are_recall_and_ndcg_of_one_target() -> None:
    assert _gains([5, 7, 9], 7, 10) == (1.0, 1.0 / math.log2(3))
    assert _gains([5, 7, 9], 9, 2) == (0.0, 0.0)


def test_a_filter_shallower_than_the_top_k_is_a_config_error() -> None:
    from moe_rec.eval.config import EvalConfig

    assert EvalConfig(filter_depth=10).filter_depth == 10
    with pytest.raises(ValueError, match="filter_depth=9"):
        EvalConfig(filter_depth=9)
