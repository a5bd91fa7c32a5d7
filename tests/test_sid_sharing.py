"""tools/sid_sharing.py: shared codes and purity per level, against hand-counted examples and a
plain loop over random catalogues."""

from __future__ import annotations

import numpy as np

from tests.tools import load_tool

sid_sharing = load_tool("sid_sharing")


def test_sharing_by_hand() -> None:
    # level 0: code 0 is service 0's twice and service 1's once (shared), code 1 service 1's only;
    # level 1: every code one service's
    codes = np.array([[0, 2], [0, 2], [0, 3], [1, 3]])
    services = np.array([0, 0, 1, 1])
    shared, purity = sid_sharing.sharing(codes, services, codebook_size=4)
    assert shared.tolist() == [1 / 2, 0.0]
    assert purity.tolist() == [(2 + 1) / 4, 1.0]  # code 0's majority holds 2 of its 3 items


def test_sharing_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    codes, services = rng.integers(0, 8, size=(300, 5)), rng.integers(0, 3, size=300)
    shared, purity = sid_sharing.sharing(codes, services, codebook_size=8)
    for level in range(5):
        owners = {c: [s for s, x in zip(services, codes[:, level]) if x == c] for c in set(codes[:, level])}
        multi = sum(len(set(v)) > 1 for v in owners.values()) / len(owners)
        majority = sum(max(v.count(s) for s in set(v)) for v in owners.values()) / len(services)
        assert np.isclose(shared[level], multi) and np.isclose(purity[level], majority)
