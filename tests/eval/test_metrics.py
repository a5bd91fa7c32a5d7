"""Recall@K / NDCG@K against a plain-Python reference on hand-written rankings (target at rank 1,
K and K+1, absent, padding, duplicates), per service and overall (micro and macro); two gloo ranks
that split the requests reduce to the single-process result; the rich table lists every service."""

from __future__ import annotations

import math
import os
import pickle
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from rich.console import Console

from moe_rec.eval.metrics import RankingMetrics, metrics_table, target_rank

KS = (5, 10, 20)


def reference_rank(ranked: list[int], target: int) -> int:
    """1-based rank among distinct real items (padding -1 skipped, a repeat takes no place); 0 if absent."""
    distinct: list[int] = []
    for item in ranked:
        if item != -1 and item not in distinct:
            distinct.append(item)
    return distinct.index(target) + 1 if target in distinct else 0


def reference_metrics(cases: list[tuple[list[int], int, str]], ks=KS) -> dict[str, float]:
    """The expected results written out with loops and math.log2."""
    per_service: dict[str, list[dict[str, float]]] = {}
    for ranked, target, service in cases:
        rank = reference_rank(ranked, target)
        row = {}
        for k in ks:
            row[f"recall@{k}"] = 1.0 if 0 < rank <= k else 0.0
            row[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if 0 < rank <= k else 0.0
        per_service.setdefault(service, []).append(row)
    names = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    every = [row for rows in per_service.values() for row in rows]
    out = {"test/count": float(len(every)), "test/macro/count": float(len(per_service))}
    for name in names:
        out[f"test/{name}"] = sum(r[name] for r in every) / len(every)
        means = [sum(r[name] for r in rows) / len(rows) for rows in per_service.values()]
        out[f"test/macro/{name}"] = sum(means) / len(means)
    for service, rows in per_service.items():
        out[f"test/{service}/count"] = float(len(rows))
        for name in names:
            out[f"test/{service}/{name}"] = sum(r[name] for r in rows) / len(rows)
    return out


def padded(items: list[int], width: int = 25) -> list[int]:
    return items + [-1] * (width - len(items))


# (ranking, target, service); items 100.. are fillers that are never the target
CASES: list[tuple[list[int], int, str]] = [
    (padded([7, 100, 101]), 7, "beauty"),  # rank 1
    (padded([100, 101, 102, 103, 7]), 7, "beauty"),  # rank 5 = K
    (padded([100, 101, 102, 103, 104, 7]), 7, "beauty"),  # rank 6 = K + 1
    (padded(list(range(100, 109)) + [7]), 7, "toys"),  # rank 10
    (padded(list(range(100, 110)) + [7]), 7, "toys"),  # rank 11
    (padded(list(range(100, 119)) + [7]), 7, "toys"),  # rank 20
    (list(range(100, 120)) + [7, -1, -1, -1, -1], 7, "toys"),  # rank 21: beyond every K
    (padded([100, 101]), 7, "sports"),  # absent, mostly padding
    (padded([]), 7, "sports"),  # an empty ranking
    (padded([100, 100, 100, 101, 101, 7]), 7, "sports"),  # duplicates collapse: rank 3
    (padded([7, 7, 100]), 7, "sports"),  # a repeated target counts once: rank 1
    (padded([100, -1, 101, 7]), 7, "beauty"),  # padding inside the list takes no place: rank 3
]


def _tensors(cases: list[tuple[list[int], int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    ranked = torch.tensor([c[0] for c in cases])  # (B, 25)
    target = torch.tensor([c[1] for c in cases])  # (B,)
    return ranked, target, [c[2] for c in cases]


def test_target_rank_matches_the_reference() -> None:
    ranked, target, _ = _tensors(CASES)
    expected = [reference_rank(r, t) for r, t, _ in CASES]
    assert expected == [1, 5, 6, 10, 11, 20, 21, 0, 0, 3, 1, 3]  # the cases say what they test
    assert target_rank(ranked, target).tolist() == expected


def test_metrics_match_the_reference() -> None:
    metrics = RankingMetrics(["beauty", "sports", "toys"])
    ranked, target, services = _tensors(CASES)
    metrics.update(ranked[:5], target[:5], services[:5])  # two batches: the sums accumulate
    metrics.update(ranked[5:], target[5:], services[5:])
    metrics.reduce()  # no process group: nothing to sum
    got = metrics.compute()
    expected = reference_metrics(CASES)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_hand_computed_values() -> None:
    """A few numbers written down without the reference: rank 1 -> 1, rank 3 -> 1/2, rank 6 misses @5."""
    metrics = RankingMetrics(["a", "b"], ks=(5, 10))
    ranked = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, -1, -1, -1], [0, 0, 0, 0, 0, 0]])
    metrics.update(ranked, torch.tensor([1, 7, 6]), ["a", "a", "b"])
    r = metrics.compute()
    assert r["test/a/recall@5"] == 1.0 and r["test/a/ndcg@5"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["test/b/recall@10"] == 0.0 and r["test/b/ndcg@10"] == 0.0
    assert r["test/recall@5"] == pytest.approx(2 / 3) and r["test/ndcg@5"] == pytest.approx(1.5 / 3)
    assert r["test/macro/recall@5"] == pytest.approx(0.5) and r["test/macro/ndcg@5"] == pytest.approx(0.375)


def test_service_without_requests_is_left_out_of_the_macro_mean() -> None:
    metrics = RankingMetrics(["a", "b"], prefix="valid")
    metrics.update(torch.tensor([[3, 1]]), torch.tensor([1]), ["a"])
    r = metrics.compute()
    assert "valid/b/recall@10" not in r and r["valid/macro/count"] == 1.0
    assert r["valid/macro/ndcg@10"] == r["valid/ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_bad_input_is_refused() -> None:
    metrics = RankingMetrics(["a"])
    with pytest.raises(ValueError, match="unknown service"):
        metrics.update(torch.tensor([[1]]), torch.tensor([1]), ["z"])
    with pytest.raises(ValueError, match="targets"):
        metrics.update(torch.tensor([[1]]), torch.tensor([-1]), ["a"])
    with pytest.raises(ValueError, match="expected ranked"):
        metrics.update(torch.tensor([1, 2]), torch.tensor([1]), ["a"])
    with pytest.raises(ValueError, match="reserved"):
        RankingMetrics(["macro"])
    metrics.reduce()
    with pytest.raises(RuntimeError, match="already"):
        metrics.reduce()


def test_metrics_table_has_a_row_per_service_and_the_means() -> None:
    metrics = RankingMetrics(["beauty", "sports", "toys"])
    metrics.update(*_tensors(CASES))
    table = metrics_table(metrics.compute())
    assert [c.header for c in table.columns] == [
        "service", "requests", "R@5", "N@5", "R@10", "N@10", "R@20", "N@20",
    ]  # fmt: skip
    assert list(table.columns[0].cells) == ["beauty", "sports", "toys", "all", "macro"]
    assert list(table.columns[1].cells) == ["4", "4", "4", "12", "-"]
    assert list(table.columns[2].cells)[0] == "0.7500"  # beauty R@5: ranks 1, 5, 6, 3
    assert list(table.columns[6].cells)[2] == "0.7500"  # toys R@20: ranks 10, 11, 20, 21
    console = Console(record=True, width=120)
    console.print(table)
    assert "macro" in console.export_text()


# ---- two ranks over gloo -------------------------------------------------------------------------

WORLD = 2


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    result: dict = {}
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        metrics = RankingMetrics(["beauty", "sports", "toys"])
        mine = CASES[rank::WORLD]  # uneven per service: rank 0 and rank 1 see different services mixes
        metrics.update(*_tensors(mine))
        metrics.reduce()
        result = metrics.compute()
        torch.distributed.destroy_process_group()
    except Exception:
        result = {"error": traceback.format_exc()}
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


@pytest.mark.slow
def test_two_ranks_reduce_to_the_single_process_result(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, tmp_path), nprocs=WORLD, join=True)
    single = RankingMetrics(["beauty", "sports", "toys"])
    single.update(*_tensors(CASES))
    expected = single.compute()
    for rank in range(WORLD):
        got = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert "error" not in got, got["error"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (rank, key)


def test_groups_are_reported_like_services_and_leave_the_totals_alone() -> None:
    """A request also counted in a group (cold / warm target): each group's numbers are the reference
    on its requests alone; the overall and macro means and the per-service rows are unchanged."""
    groups = ["cold" if i % 3 == 0 else "warm" for i in range(len(CASES))]
    metrics = RankingMetrics(["beauty", "sports", "toys"], groups=("cold", "warm"))
    ranked, target, services = _tensors(CASES)
    metrics.update(ranked, target, services, groups)
    got = metrics.compute()
    expected = reference_metrics(CASES)
    for group in ("cold", "warm"):
        mine = reference_metrics([c for c, g in zip(CASES, groups) if g == group])
        for key, value in mine.items():
            if key.count("/") == 1 and not key.endswith("/count"):
                scoped = key.replace("test/", f"test/{group}/")
                assert got[scoped] == pytest.approx(value, abs=1e-12), scoped
        assert got[f"test/{group}/count"] == groups.count(group)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(ValueError, match="group"):
        metrics.update(ranked, target, services)  # a group per request is required
    with pytest.raises(ValueError, match="group"):
        RankingMetrics(["beauty", "cold"], groups=("cold",))
