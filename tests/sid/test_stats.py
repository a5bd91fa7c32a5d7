"""Stats against brute force over all pairs / groups on small random inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_rec.sid.stats import (
    category_coherence,
    codebook_usage,
    collision_rate,
    leaf_categories,
    max_dedup_depth,
)


def test_coherence_equals_pair_enumeration() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 5, (60, 3), generator=g)
    cats = [None if i % 11 == 0 else f"c{int(torch.randint(0, 4, (1,), generator=g))}" for i in range(60)]
    same_code, same_code_cat, total, same_cat = 0, 0, 0, 0
    for i, j in itertools.combinations([i for i in range(60) if cats[i] is not None], 2):
        total += 1
        same_cat += cats[i] == cats[j]
        if codes[i, 0] == codes[j, 0]:
            same_code += 1
            same_code_cat += cats[i] == cats[j]
    out = category_coherence(codes, cats)
    assert out["same_code_pairs"] == same_code
    assert out["ratio"] == pytest.approx((same_code_cat / same_code) / (same_cat / total))


def test_coherence_of_category_codes_is_high_and_of_random_codes_near_one() -> None:
    g = torch.Generator().manual_seed(0)
    cats_idx = torch.randint(0, 8, (4000,), generator=g)
    cats = [f"c{i}" for i in cats_idx.tolist()]
    perfect = category_coherence(cats_idx, cats)  # first code = category: every same-code pair matches
    assert perfect["same_code_rate"] == 1.0
    assert perfect["ratio"] == pytest.approx(1 / perfect["random_rate"])
    unrelated = category_coherence(torch.randint(0, 8, (4000,), generator=g), cats)
    # independent codes: the ratio's spread is 0.0023 over 200 seeds (about sqrt(2 * 7 * 7) / 4000,
    # the chi-square spread of the 8 x 8 code-by-category table); 0.02 is 8 of those
    assert unrelated["ratio"] == pytest.approx(1.0, abs=0.02)


def test_collisions_and_dedup_depth_match_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 3, (200, 2), generator=g)
    services = torch.randint(0, 2, (200,), generator=g)
    keys = [(int(s), *c) for s, c in zip(services, codes.tolist(), strict=True)]
    sizes = {k: keys.count(k) for k in set(keys)}
    assert collision_rate(services, codes) == pytest.approx(sum(sizes[k] > 1 for k in keys) / 200)
    assert max_dedup_depth(services, codes) == max(sizes.values())


def test_codebook_usage_and_perplexity() -> None:
    uniform = torch.arange(64).repeat(10)[:, None]
    skewed = torch.cat([torch.zeros(90, dtype=torch.long), torch.arange(10)])[:, None]
    (u,) = codebook_usage(uniform, 128)
    (s,) = codebook_usage(skewed, 128)
    assert (u["used"], u["used_frac"]) == (64, 0.5)
    assert u["perplexity"] == pytest.approx(64)
    p = torch.tensor([91 / 100] + [1 / 100] * 9)
    assert s["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_leaf_categories() -> None:
    paths = [["Beauty", "Makeup", " Face "], None, [], ["", "x", " "]]
    assert leaf_categories(paths) == ["Face", None, None, "x"]
