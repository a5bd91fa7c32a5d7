"""The privacy audit's parts against plain loops: the AUC against counting every member /
non-member pair, the per-window loss and rank against one request per position scored in float64,
canary exposure likewise, and the membership plumbing (equal-size member sample, canary users left
out, which way round the AUC reads)."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from moe_rec.data.canaries import Canary, canary_user
from moe_rec.data.positions import item_batch
from moe_rec.data.sequences import prompt
from moe_rec.eval import privacy_audit
from moe_rec.eval.exact import request_log_probs
from moe_rec.eval.privacy_audit import (
    auc,
    bootstrap_auc,
    canary_exposure,
    exposure,
    latest_windows,
    membership_audit,
    window_scores,
)
from tests.eval.test_exact import _model, _requests, _table


def _pairwise(positive: list[float], negative: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_the_share_of_pairs_won_ties_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.integers(0, 6, size=int(rng.integers(1, 40))).astype(float)  # many ties
    negative = rng.integers(0, 5, size=int(rng.integers(1, 40))).astype(float)
    assert auc(positive, negative) == pytest.approx(
        _pairwise(positive.tolist(), negative.tolist()), abs=1e-12
    )
    assert auc(positive, negative) == pytest.approx(1 - auc(negative, positive), abs=1e-12)
    assert auc([1.0, 2.0], [0.0]) == 1.0 and auc([0.0], [1.0, 2.0]) == 0.0 and auc([1.0], [1.0]) == 0.5
    assert math.isnan(auc([], [1.0]))


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(0.3, 1, 40), rng.normal(0, 1, 40)
    large = rng.normal(0.3, 1, 4000), rng.normal(0, 1, 4000)
    low, high = bootstrap_auc(*small, rounds=400, seed=1)
    assert low < auc(*small) < high and (low, high) == bootstrap_auc(*small, rounds=400, seed=1)
    low2, high2 = bootstrap_auc(*large, rounds=200, seed=1)
    assert low2 < auc(*large) < high2 and high2 - low2 < (high - low) / 4


def test_exposure_runs_from_zero_to_log2_n() -> None:
    assert exposure(1, 1024) == 10.0 and exposure(1024, 1024) == 0.0 and exposure(32, 1024) == 5.0


def _windows(table, seed: int, n: int = 5) -> list[dict]:
    """Training windows (labels present) from the test requests' histories, >= 2 events each."""
    rows = []
    for r in _requests(table, seed, n=4 * n):
        if len(r["input_ids"]) - 2 >= 2 * table.vocabulary().tokens_per_item:
            rows.append({"user": r["user"], "input_ids": r["input_ids"][:-1], "domain_ids": r["domain_ids"][:-1],
                         "labels": [0] * (len(r["input_ids"]) - 1)})  # fmt: skip
    return rows[:n]


def _brute_rank_and_loss(model, table, request: dict, target_row: int) -> tuple[int, float]:
    """One request alone; float64 scores of every item of its service; rank with ties to the lower row."""
    log_probs, _, _ = request_log_probs(model, item_batch([request], table.vocabulary(), 16, left_pad=True))
    lp = log_probs[0].double()
    rows = [j for j in range(len(table)) if table.services[int(table.service_index[j])] == request["service"]]
    score = {j: sum(float(lp[p, c]) for p, c in enumerate(table.codes[j].tolist())) for j in rows}
    rank = 1 + sum(
        1 for j in rows if score[j] > score[target_row] or (score[j] == score[target_row] and j < target_row)
    )
    loss = math.log(sum(math.exp(v) for v in score.values())) - score[target_row]
    return rank, loss


def test_window_scores_match_one_request_per_position_in_float64() -> None:
    table = _table(12)
    model = _model(table, 12)
    vocab = table.vocabulary()
    rows = _windows(table, 12)
    got = window_scores(model, table, rows, batch_size=2)
    s = vocab.tokens_per_item
    for i, row in enumerate(rows):
        ranks, losses = [], []
        events = (len(row["input_ids"]) - 1) // s
        for t in range(events):  # position t ([BOS] + t events) predicts event t + 1
            tokens = row["input_ids"][1 + t * s : 1 + (t + 1) * s]
            service = vocab.services[tokens[0] - vocab.service_offset]
            target = int(table.rows_for_codes([service], torch.tensor([tokens[1:]]) - torch.tensor(
                [vocab.code_token_range(d)[0] for d in range(vocab.levels + 1)]))[0])  # fmt: skip
            request = {"user": row["user"], "service": service,
                       "input_ids": row["input_ids"][: 1 + t * s] + [vocab.service_token(service)],
                       "domain_ids": row["domain_ids"][: 1 + t * s] + [vocab.service_index(service)]}  # fmt: skip
            rank, loss = _brute_rank_and_loss(model, table, request, target)
            ranks.append(rank)
            losses.append(loss)
        assert got["positions"][i] == events
        assert got["loss"][i] == pytest.approx(np.mean(losses), abs=1e-4)
        assert got["rank"][i] == pytest.approx(np.mean(np.log2(ranks)), abs=1e-9)


def test_canary_exposure_matches_a_float64_loop() -> None:
    table = _table(13)
    model = _model(table, 13)
    vocab = table.vocabulary()
    canaries = [
        Canary("a", ("a1", "a5", "a7"), "a9"),
        Canary("c", ("c3",), "c40"),
        Canary("b", ("b2", "b3"), "b0"),
    ]
    got = canary_exposure(model, table, canaries)
    for k, c in enumerate(canaries):
        items = [(c.service, codes) for codes in table.codes_for(c.service, list(c.context)).tolist()]
        request = {"user": "", "service": c.service, **prompt(vocab, items, c.service)}
        rank, _ = _brute_rank_and_loss(model, table, request, int(table.rows(c.service, [c.item])[0]))
        n = {"a": 30, "b": 12, "c": 45}[c.service]
        assert got["ranks"][k] == rank and got["exposures"][k] == pytest.approx(
            math.log2(n) - math.log2(rank), abs=1e-4
        )
    assert got["count"] == 3 and canary_exposure(model, table, [])["count"] == 0


def test_membership_compares_equal_numbers_and_a_lower_member_loss_reads_as_auc_one(monkeypatch) -> None:
    users = [f"m{i}" for i in range(30)]
    train = datasets.Dataset.from_list(
        [{"user": u, "input_ids": [w]} for u in users for w in (2, 1)]  # two windows each, latest first
        + [{"user": canary_user(0, c), "input_ids": [9]} for c in range(5)]
    )
    holdout = datasets.Dataset.from_list([{"user": f"h{i}", "input_ids": [2]} for i in range(8)])
    seen = {}

    def fake_scores(model, table, rows, **kwargs):  # members: loss 1, held-out users: loss 2
        seen[kwargs["description"]] = rows
        loss = np.array([1.0 if r["user"].startswith("m") else 2.0 for r in rows])
        return {"positions": np.full(len(rows), 3.0), "loss": loss, "rank": -loss}

    monkeypatch.setattr(privacy_audit, "window_scores", fake_scores)
    monkeypatch.setattr(privacy_audit, "ServiceCatalogue", lambda *a, **k: None)
    model = torch.nn.Linear(1, 1)
    report = membership_audit(model, None, train, holdout, rounds=50)
    assert report["members"] == report["non_members"] == 8 and report["members_available"] == 30
    assert all(r["user"].startswith("m") and r["input_ids"] == [2] for r in seen["members"])  # latest window
    assert report["loss"]["auc"] == 1.0 and report["rank"]["auc"] == 0.0  # (the fake rank runs the other way)
    assert report["positions"] == {"members": 24, "non_members": 24}
    assert latest_windows(train).keys() == set(users)  # canary users are never members


def test_window_scores_with_the_per_item_term_and_text_prior_match_requests_per_position() -> None:
    """With item vectors, item text and the text prior (the demo's model), each position of a window
    is scored as the request of its prefix: the query and the own-item correction included."""
    from moe_rec.data.positions import code_token_ranges
    from moe_rec.eval.exact import ServiceCatalogue, ranks_for_requests
    from moe_rec.model import MoERecForItemPrediction, build_config

    table = _table(14)
    vocab = table.vocabulary()
    torch.manual_seed(14)
    cfg = build_config(
        "tiny", vocab_size=vocab.size, num_domains=3, num_user_buckets=16, code_token_ranges=code_token_ranges(vocab),
        item_loss="items", item_embedding=True, num_items=len(table), item_text=True, item_text_dim=6,
        item_text_prior=True,
    )  # fmt: skip
    model = MoERecForItemPrediction(cfg).eval()
    model.set_item_text(torch.randn(len(table), 6))
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3)
    rows = _windows(table, 14, n=4)
    got = window_scores(model, table, rows, batch_size=3)
    catalogue, s = ServiceCatalogue(table), vocab.tokens_per_item
    for i, row in enumerate(rows):
        events = (len(row["input_ids"]) - 1) // s
        requests, targets = [], []
        for t in range(events):
            tokens = row["input_ids"][1 + t * s : 1 + (t + 1) * s]
            service = vocab.services[tokens[0] - vocab.service_offset]
            starts = torch.tensor([vocab.code_token_range(d)[0] for d in range(vocab.levels + 1)])
            targets.append(int(table.rows_for_codes([service], torch.tensor([tokens[1:]]) - starts)[0]))
            requests.append({"user": row["user"], "service": service,
                             "input_ids": row["input_ids"][: 1 + t * s] + [vocab.service_token(service)],
                             "domain_ids": row["domain_ids"][: 1 + t * s] + [vocab.service_index(service)]})  # fmt: skip
        log_probs, query, own = request_log_probs(model, item_batch(requests, vocab, 16, left_pad=True))
        ranks, losses = ranks_for_requests(
            log_probs,
            [r["service"] for r in requests],
            torch.tensor(targets),
            catalogue,
            query,
            model.item_table(),
            own,
        )
        assert got["loss"][i] == pytest.approx(float(losses.double().mean()), abs=1e-4)
        assert got["rank"][i] == pytest.approx(float(torch.log2(ranks.double()).mean()), abs=1e-9)
