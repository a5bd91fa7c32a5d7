"""evaluate_model against a brute-force reference: with beams covering every item of a service,
beam search ranks all items exactly, so Recall/NDCG must equal a plain loop over teacher-forced
scores of every item."""

import math

import datasets
import pytest
import torch

from moe_rec.data.sequences import user_bucket
from moe_rec.data.vocab import BOS
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.evaluate import evaluate_model, history_codes
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.sid.table import SIDTable
from tests.eval.recompute import from_predictions

SERVICES = ["a", "b"]


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_service = 12
    services = [s for s in SERVICES for _ in range(per_service)]
    codes = torch.randint(0, 4, (len(services), 2), generator=g)
    table = SIDTable.from_quantized(services=services, item_ids=[f"{s}{i}" for i, s in enumerate(services)],
                                    codes=codes, codebook_size=4, max_dedup=8)  # fmt: skip
    vocab = table.vocabulary()
    torch.manual_seed(seed)
    model = MoERecForCausalLM(build_config("tiny", vocab_size=vocab.size, num_domains=len(SERVICES))).eval()
    rows = []
    for r in range(6):
        service = SERVICES[r % 2]
        context = torch.randint(0, len(services), (3,), generator=g).tolist()
        ids, domains = [BOS], []
        for i in context:
            tokens = vocab.item_tokens(services[i], table.codes[i].tolist())
            ids += tokens
            domains += [vocab.service_index(services[i])] * len(tokens)
        domains = [domains[0], *domains, vocab.service_index(service)]
        ids.append(vocab.service_token(service))
        target = int(torch.randint(0, per_service, (1,), generator=g)) + SERVICES.index(service) * per_service
        rows.append({"user": f"u{r}", "service": service, "input_ids": ids, "domain_ids": domains,
                     "target": table.codes[target].tolist(), "target_item": f"{service}{target}"})  # fmt: skip
    return model, table, vocab, datasets.Dataset.from_list(rows)


def _reference(model, table, vocab, samples, ks=(5, 10, 20)) -> dict[str, float]:
    """Teacher-force every item of the request's service, rank by summed log-prob, plain-loop metrics."""
    hits = {k: [] for k in ks}
    gains = {k: [] for k in ks}
    for row in samples:
        scores = {}
        for i, (s, item) in enumerate(
            zip([table.services[j] for j in table.service_index.tolist()], table.item_ids)
        ):
            if s != row["service"]:
                continue
            item_tokens = vocab.item_tokens(s, table.codes[i].tolist())[1:]
            ids = torch.tensor([row["input_ids"] + item_tokens])
            domains = torch.tensor([row["domain_ids"] + [row["domain_ids"][-1]] * len(item_tokens)])
            users = torch.tensor([user_bucket(row["user"], model.config.num_user_buckets)])
            with torch.no_grad():
                logp = model(ids, domains, users).logits[0].double().log_softmax(-1)
            start = len(row["input_ids"]) - 1
            scores[str(item)] = sum(logp[start + j, t].item() for j, t in enumerate(item_tokens))
        order = sorted(scores, key=lambda x: -scores[x])
        rank = order.index(row["target_item"]) + 1
        for k in ks:
            hits[k].append(1.0 if rank <= k else 0.0)
            gains[k].append(1.0 / math.log2(rank + 1) if rank <= k else 0.0)
    return {f"test/recall@{k}": sum(hits[k]) / len(hits[k]) for k in ks} | {
        f"test/ndcg@{k}": sum(gains[k]) / len(gains[k]) for k in ks
    }


def test_full_beam_equals_brute_force_ranking() -> None:
    model, table, vocab, samples = _setup()
    got = evaluate_model(model, table, samples, EvalConfig(beam_width=20, batch_size=4))
    want = _reference(model, table, vocab, samples)
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, (key, got[key], value)
    assert got["test/count"] == len(samples)


def test_history_codes_picks_the_service_items() -> None:
    model, table, vocab, samples = _setup(1)
    row = samples[0]
    codes = history_codes(row["input_ids"], vocab, row["service"])
    body = row["input_ids"][1:-1]
    n = vocab.tokens_per_item
    expected = [vocab.decode_item(body[k : k + n])[1] for k in range(0, len(body), n)
                if vocab.decode_item(body[k : k + n])[0] == row["service"]]  # fmt: skip
    assert [tuple(c) for c in codes.tolist()] == expected


def test_saved_predictions_give_the_reported_metrics(tmp_path) -> None:
    """Beam search: every request once, its target and a ranking of distinct items of its service,
    from which a plain loop recomputes Recall/NDCG@10."""
    model, table, vocab, samples = _setup(2)
    path = tmp_path / "predictions.jsonl"
    got = evaluate_model(model, table, samples, EvalConfig(beam_width=20, batch_size=4), predictions=path)
    recall, ndcg, lines = from_predictions(path, 10)
    assert sorted(line["request"] for line in lines) == list(range(len(samples)))
    for line in lines:
        row = samples[line["request"]]
        assert (line["user"], line["service"], line["target"]) == (
            row["user"],
            row["service"],
            row["target_item"],
        )
        assert len(line["ranked"]) == len(set(line["ranked"])) == 12  # every item of the service, once
        assert all(item.startswith(row["service"]) for item in line["ranked"])
    assert recall == pytest.approx(got["test/recall@10"]) and ndcg == pytest.approx(got["test/ndcg@10"])
    assert 0 < got["test/recall@10"] < 1  # the check has hits and misses to count
