"""The Python serving API against an independent path: the prompt built here by hand and decoded
by ``constrained_beam_search`` directly must give the same items and scores; answers are k
distinct real items of the service, best first; concurrent callers get the one-at-a-time answers
in fewer batches; every bad input is a ``RequestError`` naming its field; no DeepSpeed import."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_rec.data.sequences import user_bucket
from moe_rec.data.vocab import BOS
from moe_rec.eval.beam_search import constrained_beam_search
from moe_rec.export import load_bundle
from moe_rec.serve import Recommendation, Recommender, RequestError
from moe_rec.serve.config import ServeConfig
from tests.eval.test_beam_search import teacher_forced_scores
from tests.serve.conftest import ITEMS_PER_SERVICE, SERVICES, USER_BUCKETS, make_bundle

HISTORY = [("grocery", "grocery-3"), ("market", "market-10"), ("grocery", "grocery-17"),
           ("delivery", "delivery-2"), ("market", "market-41"), ("grocery", "grocery-8")]  # fmt: skip


def _assert_same(got: list[Recommendation], want: list[Recommendation]) -> None:
    """Same items in the same order; scores equal up to float noise (left padding in a batch reorders
    the fp32 sums of L+1 log-probabilities of order 20, each rounding ~2e-6)."""
    assert [(r.item_id, r.fields) for r in got] == [(r.item_id, r.fields) for r in want]
    assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-4)


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Iterator[Recommender]:
    with Recommender.from_bundle(tiny_bundle, ServeConfig(device="cpu", max_wait_ms=20.0)) as r:
        yield r


def _direct(bundle_path: Path, history: list[tuple[str, str]], service: str, k: int, exclude_seen: bool,
            user_id: str | None, width: int) -> list[tuple[str, float]]:  # fmt: skip
    """The reference: a prompt written out by hand, one beam search, codes -> item ids."""
    b = load_bundle(bundle_path)
    ids, domains = [BOS], []
    for s, item in history:
        tokens = b.vocab.item_tokens(s, b.table.codes_for(s, [item])[0].tolist())
        ids += tokens
        domains += [b.vocab.service_index(s)] * len(tokens)
    ids.append(b.vocab.service_token(service))
    domains.append(b.vocab.service_index(service))
    seen = [item for s, item in history if s == service] if exclude_seen else []
    codes, scores = constrained_beam_search(
        b.model, b.trie, b.vocab,
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        domain_ids=torch.tensor([[domains[0], *domains]]),
        user_ids=torch.tensor([user_bucket(user_id or "", b.model.config.num_user_buckets)]),
        services=[service], beam_width=width, exclude_codes=[b.table.codes_for(service, seen)],
    )  # fmt: skip
    live = torch.isfinite(scores[0])  # fewer than `width` items left: dead beams at the end
    items = b.table.item_ids_for([service] * int(live.sum()), codes[0][live])
    return list(zip(items, scores[0][live].tolist()))[:k]


@pytest.mark.parametrize(
    "service, k, exclude_seen, user_id",
    [("grocery", 10, True, None), ("market", 5, False, "user-7"), ("delivery", 50, True, "u1")],
)
def test_recommend_matches_a_direct_beam_search(
    rec: Recommender, tiny_bundle: Path, service: str, k: int, exclude_seen: bool, user_id: str | None
) -> None:
    got = rec.recommend(HISTORY, service, k=k, exclude_seen=exclude_seen, user_id=user_id)
    want = _direct(tiny_bundle, HISTORY, service, k, exclude_seen, user_id, rec.config.max_k)
    assert [r.item_id for r in got] == [item for item, _ in want]
    assert [r.score for r in got] == pytest.approx([s for _, s in want], abs=1e-5)  # the same decode, fp32
    seen = {item for s, item in HISTORY if s == service}
    expect_len = min(k, ITEMS_PER_SERVICE - (len(seen) if exclude_seen else 0))
    assert len(got) == expect_len == len({r.item_id for r in got})  # k distinct items (50 minus seen)
    assert [r.score for r in got] == sorted((r.score for r in got), reverse=True)
    assert all(r.score < 0 for r in got)  # log-probabilities
    for r in got:
        assert r.service == service and r.item_id.startswith(f"{service}-")
        i = int(r.item_id.split("-")[1])
        assert r.fields == {"title": f"{service} item {i}", "brand": f"brand-{i % 5}",
                            "categories": [service, f"aisle-{i % 3}"], "price": 1.0 + i}  # fmt: skip
    if exclude_seen:
        assert not seen & {r.item_id for r in got}


@pytest.mark.parametrize("unseen", [8, 5, 3, 0])
def test_a_history_covering_most_of_the_service_gets_the_best_unseen_items(
    tiny_bundle: Path, unseen: int
) -> None:
    """All but ``unseen`` grocery items seen, k=5: the ``min(5, unseen)`` best unseen items by their
    teacher-forced score (every unseen item scored, so the reference does not rely on beam search)."""
    import random

    k, ids = 5, [f"grocery-{i}" for i in range(ITEMS_PER_SERVICE)]
    random.Random(unseen).shuffle(ids)
    seen, left = ids[unseen:], ids[:unseen]
    history = [("grocery", item) for item in seen]
    with Recommender.from_bundle(tiny_bundle, ServeConfig(device="cpu", max_k=10)) as rec:
        got = rec.recommend(history, "grocery", k=k)
        b = rec.bundle
        prompt_ids, domains = [BOS], []
        for service, item in history[-rec.max_history :]:
            tokens = b.vocab.item_tokens(service, b.table.codes_for(service, [item])[0].tolist())
            prompt_ids += tokens
            domains += [b.vocab.service_index(service)] * len(tokens)
        prompt_ids.append(b.vocab.service_token("grocery"))
        domains.append(b.vocab.service_index("grocery"))
        want: list[tuple[str, float]] = []
        if left:
            codes = b.table.codes_for("grocery", left)
            user = user_bucket("", USER_BUCKETS)
            scores = teacher_forced_scores(
                b.model, b.vocab, (prompt_ids, [domains[0], *domains]), user, "grocery", codes
            )
            want = sorted(zip(left, scores.tolist()), key=lambda p: -p[1])[:k]
        assert [r.item_id for r in got] == [item for item, _ in want]
        assert [r.score for r in got] == pytest.approx([s for _, s in want], abs=1e-4)  # as _assert_same
        assert rec.available(history, "grocery") == unseen
        assert rec.available(history, "grocery", exclude_seen=False) == ITEMS_PER_SERVICE


def test_history_forms_and_truncation(rec: Recommender) -> None:
    as_dicts = [{"service": s, "item_id": i, "timestamp": 5} for s, i in HISTORY]  # extra keys ignored
    assert rec.recommend(as_dicts, "market") == rec.recommend(HISTORY, "market")
    assert rec.max_history == 20  # the bundle's sequences.max_events
    long = [("grocery", f"grocery-{i % ITEMS_PER_SERVICE}") for i in range(30)] + HISTORY
    truncated = rec.recommend(long[-rec.max_history :], "delivery", exclude_seen=False)
    assert rec.recommend(long, "delivery", exclude_seen=False) == truncated
    assert rec.recommend(long[-rec.max_history - 1 :], "delivery", exclude_seen=False) == truncated


def test_a_bundle_trained_asked_last_moves_the_asked_service_last_before_the_cap(
    rec: Recommender, tmp_path: Path
) -> None:
    with Recommender.from_bundle(
        make_bundle(tmp_path / "b", order="asked_last"), ServeConfig(device="cpu")
    ) as last:
        for service in ("market", "grocery"):
            moved = [e for e in HISTORY if e[0] != service] + [e for e in HISTORY if e[0] == service]
            assert moved != HISTORY
            assert last.recommend(HISTORY, service) == rec.recommend(moved, service)
        # 30 grocery items after the history: the cap keeps the asked market's items, not the latest
        long = HISTORY + [("grocery", f"grocery-{i}") for i in range(30)]
        market = [e for e in long if e[0] == "market"]
        kept = [e for e in long if e[0] != "market"][-(last.max_history - len(market)) :] + market
        assert last.recommend(long, "market", exclude_seen=False) == rec.recommend(
            kept, "market", exclude_seen=False
        )


def test_concurrent_callers_get_the_one_at_a_time_answers_in_fewer_batches(tiny_bundle: Path) -> None:
    requests = [
        (
            HISTORY[: 1 + i % len(HISTORY)],
            SERVICES[i % 3],
            3 + i % 8,
            i % 2 == 0,
            f"user-{i}" if i % 3 else None,
        )
        for i in range(16)
    ]
    with Recommender.from_bundle(tiny_bundle, ServeConfig(device="cpu", max_batch_size=1)) as single:
        alone = [single.recommend(*r) for r in requests]
        assert single.stats()["batches"] == 16
    with Recommender.from_bundle(
        tiny_bundle, ServeConfig(device="cpu", max_batch_size=32, max_wait_ms=200.0)
    ) as rec:
        results: list[list[Recommendation] | None] = [None] * 16
        start = threading.Barrier(16)

        def call(i: int) -> None:
            start.wait()
            results[i] = rec.recommend(*requests[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = rec.stats()
    for got, want in zip(results, alone):
        _assert_same(got, want)
    assert stats["requests"] == 16 and stats["batches"] < 16
    assert stats["mean_batch_size"] == pytest.approx(16 / stats["batches"])
    assert stats["items_scored"] == sum(len(r) for r in alone)


def test_recommend_many_answers_each_request_in_place(rec: Recommender) -> None:
    good = [{"history": HISTORY, "service": "grocery", "k": 4}, {"history": HISTORY[:2], "service": "market"}]
    out = rec.recommend_many(
        [good[0], {"history": [], "service": "market"}, good[1], {"service": "x", "history": HISTORY, "q": 1}]
    )
    _assert_same(out[0], rec.recommend(HISTORY, "grocery", k=4))
    _assert_same(out[2], rec.recommend(HISTORY[:2], "market"))
    assert isinstance(out[1], RequestError) and out[1].field == "history"
    assert isinstance(out[3], RequestError) and out[3].field == "q"


@pytest.mark.parametrize(
    "history, service, kwargs, field",
    [
        (HISTORY, "books", {}, "service"),
        (HISTORY, 3, {}, "service"),
        ([], "grocery", {}, "history"),
        ("grocery-3", "grocery", {}, "history"),
        ({"service": "grocery", "item_id": "grocery-3"}, "grocery", {}, "history"),
        ([*HISTORY, ("grocery", "nope")], "grocery", {}, "history[6].item_id"),
        ([("grocery", "market-3")], "grocery", {}, "history[0].item_id"),  # an item of another service
        ([("books", "b-1")], "grocery", {}, "history[0].service"),
        ([{"item_id": "grocery-3"}], "grocery", {}, "history[0].service"),
        ([{"service": "grocery"}], "grocery", {}, "history[0].item_id"),
        ([("grocery", 3)], "grocery", {}, "history[0].item_id"),
        ([("grocery",)], "grocery", {}, "history[0]"),
        ([42], "grocery", {}, "history[0]"),
        (HISTORY, "grocery", {"k": 0}, "k"),
        (HISTORY, "grocery", {"k": 51}, "k"),
        (HISTORY, "grocery", {"k": 2.0}, "k"),
        (HISTORY, "grocery", {"k": True}, "k"),
        (HISTORY, "grocery", {"exclude_seen": "yes"}, "exclude_seen"),
        (HISTORY, "grocery", {"user_id": 12}, "user_id"),
    ],
)
def test_bad_requests_name_their_field(rec: Recommender, history, service, kwargs, field: str) -> None:
    before = rec.stats()
    with pytest.raises(RequestError) as err:
        rec.recommend(history, service, **kwargs)
    assert err.value.field == field and isinstance(err.value, ValueError)
    after = rec.stats()
    assert after["rejected"] == before["rejected"] + 1
    assert after["batches"] == before["batches"]  # never queued


def test_item_lookup(rec: Recommender) -> None:
    assert rec.item("market", "market-4") == {"service": "market", "item_id": "market-4", "title": "market item 4",
                                              "brand": "brand-4", "categories": ["market", "aisle-1"], "price": 5.0}  # fmt: skip
    with pytest.raises(RequestError) as err:
        rec.item("market", "market-50")  # in the catalogue given to export, but has no semantic ID
    assert err.value.field == "item_id"
    with pytest.raises(RequestError) as err:
        rec.item("books", "market-4")
    assert err.value.field == "service"


def test_a_nan_catalogue_field_comes_back_as_none(tmp_path: Path) -> None:
    import json

    import pyarrow as pa

    from moe_rec.export import export_model
    from tests.serve.conftest import tiny_catalogue, tiny_model, tiny_table

    table = tiny_table()
    catalogue = tiny_catalogue(table)
    prices = [float("nan")] * catalogue.num_rows  # a source without prices
    catalogue = catalogue.set_column(catalogue.schema.get_field_index("price"), "price", pa.array(prices))
    vocab = table.vocabulary()
    bundle = export_model(tiny_model(vocab), table, vocab, catalogue, tmp_path / "b", dtype="float32")
    with Recommender.from_bundle(bundle, ServeConfig(device="cpu")) as rec:
        assert rec.item("grocery", "grocery-3")["price"] is None
        got = rec.recommend([("grocery", "grocery-1")], "grocery", k=3)
        assert [r.fields["price"] for r in got] == [None] * 3
        json.dumps([r.fields for r in got], allow_nan=False)  # what the HTTP layer must be able to send


def test_info_close_and_bf16(tiny_bundle: Path, tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "bf16", dtype="bfloat16")
    with Recommender.from_bundle(path, ServeConfig(device="cpu")) as rec:
        assert rec.services == list(SERVICES) and rec.config.max_k == 50
        assert rec.info["dtype"] == "bfloat16" and rec.info["device"] == "cpu"
        assert rec.info["items_per_service"] == dict.fromkeys(SERVICES, ITEMS_PER_SERVICE)
        got = rec.recommend(HISTORY, "grocery", k=10)
        assert len({r.item_id for r in got}) == 10 and all(r.item_id.startswith("grocery-") for r in got)
    with pytest.raises(RuntimeError, match="closed"):
        rec.recommend(HISTORY, "grocery")
    rec.close()  # idempotent


@pytest.mark.slow  # a fresh process imports torch and loads the bundle: ~6-20 s
def test_serving_never_imports_deepspeed(tiny_bundle: Path) -> None:
    code = (
        "import sys, moe_rec.serve\n"
        f"r = moe_rec.serve.Recommender.from_bundle({str(tiny_bundle)!r}, moe_rec.serve.ServeConfig(device='cpu'))\n"
        "assert len(r.recommend([('grocery', 'grocery-1')], 'market', k=3)) == 3\n"
        "r.close()\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.gpu
def test_cuda_gives_the_cpu_answers(tiny_bundle: Path, rec: Recommender) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with Recommender.from_bundle(tiny_bundle) as gpu:
        assert gpu.info["device"].startswith("cuda")
        for service in SERVICES:
            _assert_same(gpu.recommend(HISTORY, service), rec.recommend(HISTORY, service))
