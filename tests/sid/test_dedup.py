"""Every item gets a unique full ID; dedup codes follow item ids; overflow is a clear error."""

from __future__ import annotations

import pytest
import torch

from moe_rec.sid.dedup import DedupOverflowError, assign_dedup
from moe_rec.sid.residual_kmeans import ResidualKMeans
from moe_rec.sid.table import SIDTable


def test_forced_collisions_get_unique_ids() -> None:
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(40, 8, generator=g)
    embeddings = distinct.repeat(5, 1)  # every embedding five times: guaranteed collisions
    services = ["a" if i % 3 else "b" for i in range(len(embeddings))]
    item_ids = [f"item{(i * 37) % 1000:04d}" for i in range(len(embeddings))]
    codes = ResidualKMeans.fit(embeddings, levels=2, codebook_size=4, iters=5).encode(embeddings)
    dedup = assign_dedup(services, item_ids, codes, max_dedup=64)
    full = torch.cat([codes, dedup[:, None]], 1)
    keys = {(s, *row) for s, row in zip(services, full.tolist(), strict=True)}
    assert len(keys) == len(services)
    assert int(dedup.max()) > 0
    SIDTable(services=services, item_ids=item_ids, codes=full, codebook_size=4, max_dedup=64)  # validates


def test_dedup_follows_item_id_order_not_row_order() -> None:
    services = ["a", "a", "a", "b", "a"]
    item_ids = ["z", "m", "b", "m", "q"]
    codes = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    dedup = assign_dedup(services, item_ids, codes, max_dedup=8)
    assert dedup.tolist() == [2, 1, 0, 0, 0]
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    shuffled = assign_dedup(
        [services[i] for i in perm], [item_ids[i] for i in perm], codes[perm], max_dedup=8
    )
    assert torch.equal(shuffled, dedup[perm])


def test_overflow_error_names_the_way_out() -> None:
    codes = torch.zeros(6, 2, dtype=torch.long)
    assign_dedup(["s"] * 6, [str(i) for i in range(6)], codes, max_dedup=6)
    with pytest.raises(
        DedupOverflowError, match=r"6 items of service 's'.*raise levels, codebook_size or max_dedup"
    ):
        assign_dedup(["s"] * 6, [str(i) for i in range(6)], codes, max_dedup=5)
