"""Exact ranking for the item-level model: every item's score against a brute-force float64 sum of
its codes' log-probabilities from an unpadded forward, only the asked service's items, exclusion,
a catalogue smaller than k, a never-trained (cold) item, and chunked top-k against a full sort."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_rec.data.positions import code_token_ranges, item_batch
from moe_rec.data.vocab import BOS
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.exact import (
    ServiceCatalogue,
    evaluate_exact,
    item_scores,
    position_log_probs,
    rank_exact,
    ranks_for_requests,
    reference_scores,
    request_log_probs,
    service_scores,
    target_ranks,
    top_for_requests,
    top_items,
    used_width,
)
from moe_rec.eval.metrics import target_rank
from moe_rec.model import MoERecForItemPrediction, build_config
from moe_rec.sid.table import SIDTable

SERVICES = ("a", "b", "c")
SIZES = {"a": 30, "b": 12, "c": 45}  # items per service
LEVELS, K, DEDUP = 3, 8, 4


def _table(seed: int = 0) -> SIDTable:
    g = torch.Generator().manual_seed(seed)
    services, ids, codes = [], [], []
    for s in SERVICES:
        packed = torch.randperm(K**LEVELS * DEDUP, generator=g)[: SIZES[s]]
        digits = [
            packed // (K * K * DEDUP) % K,
            packed // (K * DEDUP) % K,
            packed // DEDUP % K,
            packed % DEDUP,
        ]
        codes.append(torch.stack(digits, 1))
        services += [s] * SIZES[s]
        ids += [f"{s}{i}" for i in range(SIZES[s])]
    return SIDTable(services=services, item_ids=ids, codes=torch.cat(codes), codebook_size=K, max_dedup=DEDUP)


def _model(table: SIDTable, seed: int) -> MoERecForItemPrediction:
    torch.manual_seed(seed)
    vocab = table.vocabulary()
    cfg = build_config(
        "tiny",
        vocab_size=vocab.size,
        num_domains=3,
        num_user_buckets=16,
        code_token_ranges=code_token_ranges(vocab),
    )
    return MoERecForItemPrediction(cfg).eval()


def _requests(table: SIDTable, seed: int, n: int = 9) -> list[dict]:
    """Requests with 0-7 history items from any service, asking each service in turn."""
    vocab = table.vocabulary()
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(n):
        ask = SERVICES[r % 3]
        picks = torch.randint(len(table), (int(torch.randint(8, (1,), generator=g)),), generator=g).tolist()
        ids, doms = [BOS], []
        for row in picks:
            s = table.services[int(table.service_index[row])]
            toks = vocab.item_tokens(s, table.codes[row].tolist())
            ids += toks
            doms += [vocab.service_index(s)] * len(toks)
        ids.append(vocab.service_token(ask))
        doms.append(vocab.service_index(ask))
        target = int(torch.randint(SIZES[ask], (1,), generator=g))
        out.append({"user": f"u{r}", "service": ask, "input_ids": ids, "domain_ids": [doms[0], *doms],
                    "target_item": f"{ask}{target}", "history": picks})  # fmt: skip
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_item_is_scored_as_the_sum_of_its_code_log_probs(seed: int) -> None:
    table = _table(seed)
    model = _model(table, seed)
    requests = _requests(table, seed)
    catalogue = ServiceCatalogue(table)
    ranked = rank_exact(model, catalogue, requests, k=20)  # batched, left-padded
    vocab = table.vocabulary()
    for i, r in enumerate(requests):
        with torch.no_grad():  # the request alone, no padding
            logits = model(**item_batch([r], vocab, 16, left_pad=True)).logits[0, -1].double()
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        rows = [j for j in range(len(table)) if table.services[int(table.service_index[j])] == r["service"]]
        brute = {j: sum(float(log_probs[p, c]) for p, c in enumerate(table.codes[j].tolist())) for j in rows}
        order = sorted(brute, key=lambda j: (-brute[j], j))
        got = [j for j in ranked[i].tolist() if j >= 0]
        assert len(got) == min(20, SIZES[r["service"]])
        assert all(
            table.services[int(table.service_index[j])] == r["service"] for j in got
        )  # own service only
        # fp32 scores of order 20 against float64: ties closer than fp32 noise may swap, so compare scores
        assert [brute[j] for j in got] == pytest.approx([brute[j] for j in order[: len(got)]], abs=1e-4)


def test_scores_and_chunked_top_k_match_a_plain_reference() -> None:
    g = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(5, 4, 16, generator=g), -1)
    codes = torch.randint(16, (300, 4), generator=g)
    torch.testing.assert_close(  # fp32 sums of 4 log-probabilities against float64 (measured 1.4e-6)
        item_scores(log_probs, codes).double(), reference_scores(log_probs, codes), atol=1e-5, rtol=0
    )
    exclude = torch.rand(5, 300, generator=g) < 0.3
    full = item_scores(log_probs, codes).masked_fill(exclude, -math.inf)
    expect = torch.sort(full, dim=1, descending=True, stable=True)
    for chunk in (7, 64, 300, 1000):
        s, i = top_items(log_probs, codes, 25, exclude, chunk_items=chunk)
        assert torch.equal(i, expect.indices[:, :25]) and torch.equal(s, expect.values[:, :25])


def test_exclusion_and_a_catalogue_smaller_than_k() -> None:
    table = _table(4)
    catalogue = ServiceCatalogue(table)
    log_probs = torch.log_softmax(torch.randn(2, 4, K), -1)
    b_rows = catalogue.rows["b"].tolist()
    ranked, scores = top_for_requests(log_probs, ["b", "b"], catalogue, 20, exclude_rows=[b_rows[:5], []])
    assert set(ranked[0, :7].tolist()) == set(b_rows[5:]) and ranked[0, 7:].eq(-1).all()  # 12 - 5 left
    assert set(ranked[1, :12].tolist()) == set(b_rows) and torch.isneginf(scores[1, 12:]).all()


def test_a_cold_item_is_scored_from_its_codes_and_can_be_returned() -> None:
    """An item that no history holds gets its score from its codes alone: make its codes the most
    likely ones and it comes first."""
    table = _table(5)
    catalogue = ServiceCatalogue(table)
    cold = int(catalogue.rows["c"][17])
    log_probs = torch.full((1, 4, K), -10.0)
    for p, c in enumerate(table.codes[cold].tolist()):
        log_probs[0, p, c] = -0.1
    ranked, _ = top_for_requests(log_probs, ["c"], catalogue, 5)
    assert int(ranked[0, 0]) == cold


def test_evaluate_exact_counts_hits_like_a_plain_loop() -> None:
    table = _table(6)
    model = _model(table, 6)
    requests = _requests(table, 6, n=24)
    ranked = rank_exact(model, ServiceCatalogue(table), requests, k=20, exclude_seen=True)
    target = torch.from_numpy(
        table.rows([r["service"] for r in requests], [r["target_item"] for r in requests])
    )
    ranks = target_rank(ranked, target).tolist()
    for i, r in enumerate(requests):  # excluded: the request's own-service history items
        seen = {j for j in r["history"] if table.services[int(table.service_index[j])] == r["service"]}
        assert not seen & set(ranked[i].tolist())
    result = evaluate_exact(
        model,
        table,
        requests,
        EvalConfig(batch_size=5, exclude_seen=True),
        prefix="test",
        show_progress=False,
    )
    hits10 = sum(1 for x in ranks if 0 < x <= 10)
    ndcg10 = sum(1 / math.log2(x + 1) for x in ranks if 0 < x <= 10)
    assert result["test/recall@10"] == pytest.approx(hits10 / 24)
    assert result["test/ndcg@10"] == pytest.approx(ndcg10 / 24)


def test_the_per_item_term_joins_every_score() -> None:
    """item_embedding: score = sum of code log-probs + P x (query . item vector), brute force."""
    table = _table(7)
    vocab = table.vocabulary()
    torch.manual_seed(7)
    cfg = build_config(
        "tiny", vocab_size=vocab.size, num_domains=3, num_user_buckets=16, code_token_ranges=code_token_ranges(vocab),
        item_loss="items", item_embedding=True, num_items=len(table),
    )  # fmt: skip
    model = MoERecForItemPrediction(cfg).eval()
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3)
    requests = _requests(table, 7, n=6)
    ranked = rank_exact(model, ServiceCatalogue(table), requests, k=10)
    for i, r in enumerate(requests):
        with torch.no_grad():
            out = model(**item_batch([r], vocab, 16, left_pad=True))
        logits, query = out.logits[0, -1].double(), out.hidden_states[0, -1].double()
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        vec = model.item_embed.weight.detach().double()
        brute = {
            j: sum(float(log_probs[p, c]) for p, c in enumerate(table.codes[j].tolist()))
            + 4 * float(query @ vec[j])
            for j in range(len(table))
            if table.services[int(table.service_index[j])] == r["service"]
        }
        best = sorted(brute.values(), reverse=True)[:10]
        # fp32 against float64, as above
        assert [brute[j] for j in ranked[i].tolist()] == pytest.approx(best, abs=1e-4)


def test_per_item_term_and_own_item_correction_match_a_float64_loop() -> None:
    """top_for_requests with the per-item term (query . vector, x P) and the own-item correction
    (P x amount on one table row, and only where that row is of the request's service) ranks as a
    float64 loop over every item of the service; service_scores gives that loop's every score."""
    table = _table(7)
    catalogue = ServiceCatalogue(table)
    g = torch.Generator().manual_seed(7)
    services = ["a", "b", "c", "b"]
    log_probs = torch.log_softmax(torch.randn(4, 4, K, generator=g), -1)
    query, vectors = torch.randn(4, 6, generator=g), torch.randn(len(table), 6, generator=g)
    # own rows: one of the asked service, one of another service (no correction), none, one more
    own_rows = torch.tensor(
        [int(catalogue.rows["a"][3]), int(catalogue.rows["a"][0]), -1, int(catalogue.rows["b"][5])]
    )
    amount = torch.tensor([-50.0, -50.0, -50.0, -50.0])  # large enough to move the own item down
    ranked, _ = top_for_requests(log_probs, services, catalogue, 10, None, query, vectors, (own_rows, amount))
    p = table.codes.shape[1]
    for b, service in enumerate(services):
        rows = catalogue.rows[service].tolist()
        lp, q = log_probs[b].double(), query[b].double()
        score = {
            r: sum(float(lp[j, c]) for j, c in enumerate(table.codes[r].tolist()))
            + p * float(q @ vectors[r].double())
            + (p * float(amount[b]) if r == int(own_rows[b]) else 0.0)
            for r in rows
        }
        expect = sorted(rows, key=lambda r: -score[r])[:10]
        assert [score[r] for r in ranked[b].tolist()] == pytest.approx([score[r] for r in expect], abs=1e-3)
        every = service_scores(log_probs[b : b + 1], service, catalogue, query[b : b + 1], vectors,
                               (own_rows[b : b + 1], amount[b : b + 1]))  # fmt: skip
        assert every[0].tolist() == pytest.approx([score[r] for r in rows], abs=1e-3)
    assert int(own_rows[0]) not in ranked[0].tolist()  # corrected down and out of the top 10


def test_saved_predictions_of_exact_scoring_give_the_reported_metrics(tmp_path) -> None:
    """The item-level path of ``evaluate_model``: each request once with the top 20 of its own
    service (all when fewer are left), excluding its history's items, from which a plain loop recomputes Recall/NDCG@10."""
    import datasets

    from moe_rec.eval.evaluate import evaluate_model
    from tests.eval.recompute import from_predictions

    table = _table(8)
    requests = _requests(table, 8, n=30)
    path = tmp_path / "predictions.jsonl"
    cfg = EvalConfig(batch_size=7, exclude_seen=True)
    got = evaluate_model(_model(table, 8), table, datasets.Dataset.from_list(requests), cfg, predictions=path)
    recall, ndcg, lines = from_predictions(path, 10)
    assert sorted(line["request"] for line in lines) == list(range(30))
    for line in lines:
        r = requests[line["request"]]
        seen = {
            str(table.item_ids[j]) for j in r["history"] if str(table.item_ids[j]).startswith(r["service"])
        }
        assert (line["service"], line["target"]) == (r["service"], r["target_item"])
        assert len(line["ranked"]) == min(20, SIZES[r["service"]] - len(seen)) and not seen & set(
            line["ranked"]
        )
        assert all(item.startswith(r["service"]) for item in line["ranked"])
    assert recall == pytest.approx(got["test/recall@10"]) and ndcg == pytest.approx(got["test/ndcg@10"])
    assert 0 < got["test/recall@10"] < 1


def test_target_ranks_place_the_target_where_top_items_ranks_it() -> None:
    """Rank: 1 + the target's position in top_items' full ranking (ties included: log-probabilities
    rounded to halves make many scores equal); loss: a float64 log-softmax over every item's score."""
    g = torch.Generator().manual_seed(11)
    log_probs = torch.round(torch.log_softmax(torch.randn(6, 4, 16, generator=g), -1) * 2) / 2
    codes = torch.randint(16, (300, 4), generator=g)
    query, vectors = torch.randn(6, 5, generator=g), torch.randn(300, 5, generator=g)
    adjust = (torch.tensor([4, -1, 299, 17, 0, 150]), torch.full((6,), -3.0))
    target = torch.tensor([4, 0, 299, 123, 7, 150])
    for extra in ({}, {"query": query, "vectors": vectors, "adjust": adjust}):
        _, full = top_items(log_probs, codes, 300, **extra)
        expect = (full == target[:, None]).nonzero()[:, 1] + 1
        reference = reference_scores(log_probs, codes)
        if extra:
            reference = reference + 4 * (query.double() @ vectors.double().T)
            reference[torch.arange(6)[adjust[0] >= 0], adjust[0][adjust[0] >= 0]] += 4 * -3.0
        loss = torch.logsumexp(reference, 1) - reference[torch.arange(6), target]
        for chunk in (7, 64, 300, 1000):
            rank, got = target_ranks(log_probs, codes, target, chunk_items=chunk, **extra)
            assert torch.equal(rank, expect)
            torch.testing.assert_close(got.double(), loss, atol=1e-4, rtol=0)
    assert (expect > 1).any() and (expect < 300).any()


def test_ranks_for_requests_agree_with_top_for_requests_over_a_whole_service() -> None:
    table = _table(8)
    catalogue = ServiceCatalogue(table)
    g = torch.Generator().manual_seed(8)
    services = ["a", "b", "c", "b", "a"]
    log_probs = torch.log_softmax(torch.randn(5, 4, K, generator=g), -1)
    query, vectors = torch.randn(5, 6, generator=g), torch.randn(len(table), 6, generator=g)
    own = (
        torch.tensor([int(catalogue.rows["a"][2]), -1, int(catalogue.rows["c"][1]), 0, -1]),
        torch.full((5,), -2.0),
    )
    targets = torch.tensor([int(catalogue.rows[s][i]) for s, i in zip(services, (2, 11, 40, 0, 29))])
    ranks, losses = ranks_for_requests(log_probs, services, targets, catalogue, query, vectors, own)
    ranked, _ = top_for_requests(
        log_probs, services, catalogue, max(SIZES.values()), None, query, vectors, own
    )
    for b, t in enumerate(targets.tolist()):
        assert int(ranks[b]) == ranked[b].tolist().index(t) + 1
    assert (losses > 0).all()
    with pytest.raises(ValueError, match="not an item of b"):
        ranks_for_requests(log_probs[:1], ["b"], targets[:1], catalogue)


def test_position_log_probs_are_those_of_each_prefix_asked_as_a_request() -> None:
    """Teacher-forced, position t predicts event t + 1 (its service asked), as a request made of the
    history up to t asking that service would."""
    table = _table(9)
    model = _model(table, 9)
    vocab = table.vocabulary()
    window = _requests(table, 9, n=4)[3]  # 7 or fewer events; drop the asked service: a training window
    events = (len(window["input_ids"]) - 2) // vocab.tokens_per_item
    assert events >= 2
    row = {"user": "u", "input_ids": window["input_ids"][:-1], "domain_ids": window["domain_ids"][:-1]}
    log_probs, _, _ = position_log_probs(model, item_batch([row], vocab, 16))  # (1, T, P, K)
    s = vocab.tokens_per_item
    for t in range(events):  # position t: [BOS] + t events; it asks for event t + 1's service
        service = vocab.services[row["domain_ids"][1 + t * s]]
        request = {"user": "u", "service": service,
                   "input_ids": row["input_ids"][: 1 + t * s] + [vocab.service_token(service)],
                   "domain_ids": row["domain_ids"][: 1 + t * s] + [vocab.service_index(service)]}  # fmt: skip
        expected, _, _ = request_log_probs(model, item_batch([request], vocab, 16, left_pad=True))
        torch.testing.assert_close(log_probs[0, t], expected[0], atol=1e-5, rtol=1e-5)


def test_item_words_join_every_score_of_a_request_with_a_critique() -> None:
    """item_words: rank_exact of requests with critique words ranks as a float64 loop: the sum of
    code log-probs + P x (query . item vector + sum_f sum_s a_f(h_s) cos(e_s, mean embedding of the
    item's field-f subwords)) over the critique's words s, over the asked service's items only."""
    from moe_rec.data.vocab import CRITIQUE
    from moe_rec.model.item_model import reference_word_bags

    table = _table(9)
    vocab = table.vocabulary()
    text = 20  # text tokens after the item tokens
    start = vocab.size
    torch.manual_seed(9)
    cfg = build_config(
        "tiny", vocab_size=start + text, num_domains=3, num_user_buckets=16,
        code_token_ranges=code_token_ranges(vocab), text_token_range=[start, start + text],
        item_loss="items", item_embedding=True, num_items=len(table), item_words=True, item_word_slots=3,
    )  # fmt: skip
    model = MoERecForItemPrediction(cfg).eval()
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    g = torch.Generator().manual_seed(9)
    words = start + torch.randint(text, (len(table), 4, 3), generator=g)
    words[torch.rand(words.shape, generator=g) < 0.3] = 0  # [PAD]: fields of 0-3 subwords
    model.set_item_words(words)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3)
        model.word_weight.weight.normal_(0, 0.3)
    requests = []
    for r in _requests(table, 9, n=6):  # [CRITIQUE] and two words before the asked service
        ids, doms = r["input_ids"], r["domain_ids"]
        crit = [CRITIQUE, start + 3, start + 11]
        requests.append(
            {**r, "input_ids": ids[:-1] + crit + ids[-1:], "domain_ids": doms[:-1] + doms[-1:] * 4}
        )
    ranked = rank_exact(model, ServiceCatalogue(table), requests, k=10)
    d = cfg.hidden_size
    emb = model.model.embed_tokens.weight.detach().double()
    bags = reference_word_bags(words, emb, 0)  # (N, 4, D)
    unit = bags / bags.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gate_w, gate_b = model.word_weight.weight.detach().double(), model.word_weight.bias.detach().double()
    vec = model.item_embed.weight.detach().double()
    captured = {}
    model.model.register_forward_hook(lambda mod, args, out: captured.update(hidden=out[0]))
    for i, r in enumerate(requests):
        vocab_t = dataclasses.replace(vocab, text_size=TEXT_SIZE)
        with torch.no_grad():
            out = model(**item_batch([r], vocab_t, 16, left_pad=True))
        logits, q = out.logits[0, -1].double(), out.hidden_states[0, -1, :d].double()
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        h = captured["hidden"][0].double()  # the last two positions are the critique's words
        crit = torch.zeros(4, d, dtype=torch.float64)  # sum_s a_f(h_s) e_s
        for s, token in ((-2, start + 3), (-1, start + 11)):
            crit += (gate_w @ h[s] + gate_b)[:, None] * (emb[token] / emb[token].norm())
        brute = {
            j: sum(float(log_probs[p, c]) for p, c in enumerate(table.codes[j].tolist()))
            + 4 * (float(q @ vec[j]) + float((crit * unit[j]).sum()))
            for j in range(len(table))
            if table.services[int(table.service_index[j])] == r["service"]
        }
        best = sorted(brute.values(), reverse=True)[:10]
        assert all(j in brute for j in ranked[i].tolist())  # the asked service's items only
        assert [brute[j] for j in ranked[i].tolist()] == pytest.approx(best, abs=1e-3)


TEXT_SIZE = 20  # subwords of the critique models' text range


def _critique_model(seed: int, **overrides):
    """A tiny item model with a TEXT_SIZE-subword text range and item words over ``_table(seed)``:
    (table, vocabulary, first text token, model in eval mode)."""
    table = _table(seed)
    vocab = table.vocabulary()
    start = vocab.size
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=start + TEXT_SIZE, num_domains=3, num_user_buckets=16,
        code_token_ranges=code_token_ranges(vocab), text_token_range=[start, start + TEXT_SIZE],
        item_loss="items", item_embedding=True, num_items=len(table), item_words=True, item_word_slots=3,
        **overrides,
    )  # fmt: skip
    return table, vocab, start, MoERecForItemPrediction(cfg).eval()


def test_item_phrases_join_every_score_and_survive_a_save_and_load(tmp_path) -> None:
    """item_phrases: rank_exact ranks as code log-probs + P x (the query . the item's score vector),
    the phrase part of that dot product being the critique's phrase weights on the item's phrases;
    a request whose critique names an item's brand phrase moves that item; weights saved and loaded
    (the item words a buffer, the phrase table rebuilt from it) give the same table and ranking."""
    from moe_rec.data.vocab import CRITIQUE

    table, vocab, start, model = _critique_model(9, item_phrases=True, item_phrase_rank=4)
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    words = torch.zeros(len(table), 4, 3, dtype=torch.long)  # [PAD]
    words[:, 0, 0] = start + torch.arange(len(table)) % 5  # brand: one of 5 subwords
    words[:, 0, 1] = start + 5 + torch.arange(len(table)) % 2  # ... of two: 10 two-subword brands
    words[:, 1, 0] = start + 7 + torch.arange(len(table)) % 3  # category: one of 3
    model.set_item_words(words)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3)
        model.phrase_weight.bias.fill_(3.0)
    vocab_t = dataclasses.replace(vocab, text_size=TEXT_SIZE)
    requests = []
    for r in _requests(table, 9, n=6):  # [CRITIQUE] naming item 0's brand, before the asked service
        ids, doms = r["input_ids"], r["domain_ids"]
        crit = [CRITIQUE, start + 12, *words[0, 0, :2].tolist()]
        requests.append(
            {**r, "input_ids": ids[:-1] + crit + ids[-1:], "domain_ids": doms[:-1] + doms[-1:] * 4}
        )
    ranked = rank_exact(model, ServiceCatalogue(table), requests, k=10)
    vectors = model.item_table()
    u = model.phrases()[3].shape[1]
    for i, r in enumerate(requests):
        with torch.no_grad():
            out = model(**item_batch([r], vocab_t, 16, left_pad=True))
        logits, q = out.logits[0, -1].double(), out.hidden_states[0, -1].double()
        assert float(q[-u:] @ vectors[0, -u:].double()) > 1.0  # the named brand's phrase weight
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        brute = {
            j: sum(float(log_probs[p, c]) for p, c in enumerate(table.codes[j].tolist()))
            + 4 * float(q @ vectors[j].double())
            for j in range(len(table))
            if table.services[int(table.service_index[j])] == r["service"]
        }
        best = sorted(brute.values(), reverse=True)[:10]
        assert [brute[j] for j in ranked[i].tolist()] == pytest.approx(best, abs=1e-3)
    model.save_pretrained(tmp_path)
    loaded = MoERecForItemPrediction.from_pretrained(tmp_path).eval()
    loaded.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    torch.testing.assert_close(loaded.item_table(), vectors)
    again = rank_exact(loaded, ServiceCatalogue(table), requests, k=10)
    assert [a.tolist() for a in again] == [a.tolist() for a in ranked]


@pytest.mark.parametrize("amounts", [False, True])
def test_item_price_bins_join_every_score_and_survive_a_save_and_load(tmp_path, amounts: bool) -> None:
    """item_price_bins (with item_amounts also the size and pack bins): rank_exact ranks as code
    log-probs + P x (the query . the item's score vector), whose ordinal part is the critique's query
    over the bins (absolute and relative to the previous item of the asked service) on the item's
    one-hot bins; the bins are buffers: weights saved and loaded give the same table and ranking."""
    from moe_rec.data.item_words import PACK_BINS, SIZE_BLOCKS
    from moe_rec.data.vocab import CRITIQUE

    table, vocab, start, model = _critique_model(11, item_price_bins=5, item_amounts=amounts)
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    words = torch.zeros(len(table), 4, 3, dtype=torch.long)  # [PAD]
    words[:, 0, 0] = start + torch.arange(len(table)) % 5
    model.set_item_words(words)
    g = torch.Generator().manual_seed(11)
    bins = torch.randint(-1, 5, (len(table),), generator=g)
    model.set_item_price_bins(bins)
    width = 5
    if amounts:  # sizes near the start of the amounts' and counts' blocks, so that some compare
        kind = torch.randint(-1, 2, (len(table),), generator=g)
        size = torch.where(kind < 0, -1, kind * SIZE_BLOCKS[0] + torch.randint(4, (len(table),), generator=g))
        amount_bins = torch.stack([size, torch.randint(4, (len(table),), generator=g)], dim=1)
        model.set_item_amount_bins(amount_bins)
        width += sum(SIZE_BLOCKS) + PACK_BINS
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3)
        for layer in model.ordinal_layers():
            layer.weight.normal_(0, 0.3, generator=g)
            layer.bias.normal_(0, 1.0, generator=g)
    vocab_t = dataclasses.replace(vocab, text_size=TEXT_SIZE)
    requests = []
    for r in _requests(table, 11, n=6):  # [CRITIQUE] two words, before the asked service
        ids, doms = r["input_ids"], r["domain_ids"]
        crit = [CRITIQUE, start + 12, start + 13]
        requests.append(
            {**r, "input_ids": ids[:-1] + crit + ids[-1:], "domain_ids": doms[:-1] + doms[-1:] * 3}
        )
    ranked = rank_exact(model, ServiceCatalogue(table), requests, k=10)
    vectors = model.item_table()
    price = vectors[:, -width:][:, :5]
    assert torch.equal(price.argmax(-1)[bins >= 0], bins[bins >= 0])  # one-hot bins
    assert price[bins < 0].abs().sum() == 0  # no price: zeros
    ones = int((bins >= 0).sum()) + (int((amount_bins[:, 0] >= 0).sum()) + len(table) if amounts else 0)
    assert int(vectors[:, -width:].sum()) == ones  # one 1 per known price and size, one per pack
    moved = 0
    for i, r in enumerate(requests):
        with torch.no_grad():
            out = model(**item_batch([r], vocab_t, 16, left_pad=True))
        logits, q = out.logits[0, -1].double(), out.hidden_states[0, -1].double()
        moved += int(q[-width:].abs().sum() > 0)
        log_probs = logits - torch.logsumexp(logits, -1, keepdim=True)
        brute = {
            j: sum(float(log_probs[p, c]) for p, c in enumerate(table.codes[j].tolist()))
            + 4 * float(q @ vectors[j].double())
            for j in range(len(table))
            if table.services[int(table.service_index[j])] == r["service"]
        }
        best = sorted(brute.values(), reverse=True)[:10]
        assert [brute[j] for j in ranked[i].tolist()] == pytest.approx(best, abs=1e-3)
    assert moved == len(requests)
    model.save_pretrained(tmp_path)
    loaded = MoERecForItemPrediction.from_pretrained(tmp_path).eval()
    loaded.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    assert torch.equal(loaded.item_price_bin, bins)
    if amounts:
        assert torch.equal(torch.stack([loaded.item_size_bin, loaded.item_pack_bin], 1), amount_bins)
    torch.testing.assert_close(loaded.item_table(), vectors)
    again = rank_exact(loaded, ServiceCatalogue(table), requests, k=10)
    assert [a.tolist() for a in again] == [a.tolist() for a in ranked]


def test_zero_trailing_query_columns_are_skipped_without_changing_the_ranking() -> None:
    """used_width: up to the last non-zero column; top_items ranks a batch whose queries end in
    zeros (requests without a critique) as with the whole vectors."""
    g = torch.Generator().manual_seed(12)
    log_probs = torch.log_softmax(torch.randn(3, 4, 16, generator=g), -1)
    codes = torch.randint(16, (200, 4), generator=g)
    query, vectors = torch.randn(3, 9, generator=g), torch.randn(200, 9, generator=g)
    query[:, 5:] = 0.0
    query[1, 3] = 0.0
    assert used_width(query) == 5 and used_width(torch.zeros(2, 4)) == 0
    reference = reference_scores(log_probs, codes) + 4 * (query.double() @ vectors.double().T)
    scores, ranked = top_items(log_probs, codes, 20, query=query, vectors=vectors, chunk_items=64)
    torch.testing.assert_close(scores.double(), reference.gather(1, ranked), atol=1e-4, rtol=0)
    assert torch.equal(ranked, reference.topk(20, dim=1).indices)


@pytest.mark.parametrize("seed, weight", [(21, 0.5), (22, 1.0), (23, 2.5)])
def test_a_critique_ranking_with_its_plain_twin_ranks_the_sum_of_both_scores(
    seed: int, weight: float
) -> None:
    """rank_exact with ``plain_weight`` w: the top 10 of each request's whole-service scores with the
    critique plus w x its scores without it (each from service_scores: code log-probs, the per-item
    term, the text prior's own-item correction); w = 0 is the critique's ranking alone, requests
    without a critique rank as before, and the model's ``critique_plain_weight`` is the default."""
    from moe_rec.data.vocab import CRITIQUE
    from moe_rec.eval.exact import request_log_probs, request_parts, service_scores

    table, vocab, start, model = _critique_model(seed, item_text=True, item_text_dim=5, item_text_prior=True)
    model.set_train_catalogue(table.codes, table.service_index + vocab.service_offset)
    g = torch.Generator().manual_seed(seed)
    model.set_item_text(torch.randn(len(table), 5, generator=g))
    words = start + torch.randint(TEXT_SIZE, (len(table), 4, 3), generator=g)
    model.set_item_words(words)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.3, generator=g)
        model.word_weight.weight.normal_(0, 0.3, generator=g)
    plain = [r for r in _requests(table, seed, n=9) if r["history"]]
    critiqued = []
    for r in plain:
        crit = [CRITIQUE, start + int(torch.randint(TEXT_SIZE, (1,), generator=g)), start + 2]
        ids, doms = r["input_ids"], r["domain_ids"]
        critiqued.append(
            {**r, "input_ids": ids[:-1] + crit + ids[-1:], "domain_ids": doms[:-1] + doms[-1:] * 4}
        )
    catalogue = ServiceCatalogue(table)
    vectors = model.item_table()
    text_vocab = dataclasses.replace(vocab, text_size=TEXT_SIZE)
    with torch.no_grad():
        alone = rank_exact(model, catalogue, critiqued, 10, vectors=vectors)
        mixed = rank_exact(model, catalogue, critiqued, 10, vectors=vectors, plain_weight=weight)
        without = rank_exact(model, catalogue, plain, 10, vectors=vectors)
        assert torch.equal(
            rank_exact(model, catalogue, plain, 10, vectors=vectors, plain_weight=weight), without
        )
        twins = request_parts(model, plain, text_vocab)  # handed in, they rank as computed inside
        given = request_parts(model, critiqued, text_vocab, plain_weight=weight, plain=twins)
        assert torch.equal(rank_exact(model, catalogue, critiqued, 10, vectors=vectors, parts=given), mixed)
        alone_parts = request_parts(model, critiqued, text_vocab, plain_weight=0.0)  # other twins
        other = request_parts(model, critiqued, text_vocab, plain_weight=weight, plain=alone_parts)
        assert not torch.equal(other[0], given[0])  # the handed-in parts are the ones used
        model.config.critique_plain_weight = weight  # the model's own weight is the default
        assert torch.equal(rank_exact(model, catalogue, critiqued, 10, vectors=vectors), mixed)
        assert torch.equal(
            rank_exact(model, catalogue, critiqued, 10, vectors=vectors, plain_weight=0.0), alone
        )
        model.config.critique_plain_weight = 0.0
        for i, (c, p) in enumerate(zip(critiqued, plain, strict=True)):
            both = []
            for row in (c, p):
                lp, q, own = request_log_probs(model, item_batch([row], text_vocab, 16, left_pad=True))
                both.append(service_scores(lp, row["service"], catalogue, q, vectors, own)[0].double())
            local = catalogue.rows[c["service"]]
            for ranking, score in ((alone[i], both[0]), (mixed[i], both[0] + weight * both[1])):
                best = score.topk(10).values
                got = score[catalogue.local_of(ranking, c["service"])]
                torch.testing.assert_close(got, best, atol=1e-4, rtol=0)
                assert set(ranking.tolist()) <= set(local.tolist())
    assert not torch.equal(mixed, alone)  # the plain scores move some ranking


def test_exclude_seen_leaves_out_exactly_the_asked_services_history_items() -> None:
    """rank_exact(exclude_seen=True): each ranking is the one without exclusion with the request's
    own history items of the asked service (read from its ``history`` picks) taken out, in order."""
    table = _table(31)
    model = _model(table, 31)
    requests = _requests(table, 31, n=12)
    catalogue = ServiceCatalogue(table)
    every = max(SIZES.values())
    full = rank_exact(model, catalogue, requests, every)
    kept = rank_exact(model, catalogue, requests, every, exclude_seen=True)
    removed = 0
    for i, r in enumerate(requests):
        seen = {row for row in r["history"] if table.services[int(table.service_index[row])] == r["service"]}
        expected = [row for row in full[i].tolist() if row >= 0 and row not in seen]
        got = [row for row in kept[i].tolist() if row >= 0]
        assert got == expected
        removed += len(seen)
    assert removed > 0  # some request has history in its asked service
