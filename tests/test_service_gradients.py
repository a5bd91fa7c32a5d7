"""tools/service_gradients.py on a tiny item-level model: the per-service gradients recombine into
the whole batch's gradient (and their losses into the batch's loss), and the cosines per part equal
a float64 computation by hand."""

from __future__ import annotations

import math

import torch

from moe_rec.data.positions import item_batch
from moe_rec.data.sequences import IGNORE_INDEX
from tests.model.test_item_model import VOCAB, _catalogue, _model, _sample
from tests.tools import load_tool


def test_service_gradients_recombine_into_the_batch_gradient_and_cosines_match_by_hand() -> None:
    tool = load_tool("service_gradients")
    model = _model(31, item_loss="items")  # the full softmax: no sampled negatives, deterministic
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    catalogue = _catalogue(g)
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    batches = []
    for k in range(2):
        picks = [torch.randint(len(catalogue), (n,), generator=g).tolist() for n in (5, 3, 4)]
        # the first sequence's scored positions (all but its first item) hold every service once
        per_service = len(catalogue) // len(VOCAB.services)
        order = torch.randperm(len(VOCAB.services), generator=g).tolist()
        picks[0][1:4] = [s * per_service + int(torch.randint(per_service, (1,), generator=g)) for s in order]
        batches.append(
            item_batch(
                [_sample([catalogue[i] for i in p], f"u{k}{j}") for j, p in enumerate(picks)], VOCAB, 16
            )
        )
    services = {s: VOCAB.service_token(s) for s in VOCAB.services}
    params = dict(model.named_parameters())

    # the loss is a mean over scored positions, so the services' gradients, each weighted by its
    # share of the batch's scored positions, add up to the whole batch's gradient, and their loss
    # sums over all the positions give the batch's loss
    for batch in batches:
        per = tool.service_gradients(model, [batch], services)
        scored = batch["labels"][:, 1:, 0] != IGNORE_INDEX
        next_service = batch["item_tokens"][:, 1:, 0]
        counts = {s: int((scored & (next_service == t)).sum()) for s, t in services.items()}
        assert per.positions == counts and all(counts.values())
        share = {s: n / int(scored.sum()) for s, n in counts.items()}
        batch_loss = model(**batch).lm_loss
        assert math.isclose(
            sum(per.loss_sums.values()) / sum(counts.values()), float(batch_loss), rel_tol=1e-5
        )
        whole = torch.autograd.grad(batch_loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), whole, strict=True):
            if grad is None:
                continue
            together = sum(share[s] * per.grads[s][name] for s in services)
            torch.testing.assert_close(together, grad.double(), rtol=1e-4, atol=1e-6, msg=name)

    even = tool.service_gradients(model, batches[:1], services).grads
    odd = tool.service_gradients(model, batches[1:], services).grads
    report = tool.part_cosines(even, odd)
    assert set(report) >= {"attention", "experts (FFN)", "code heads", "embeddings (codes, services)"}
    for part, r in report.items():
        names = [n for n in params if tool.part_of(n) == part]
        vec = {s: [float(x) for n in names for x in (even[s][n] + odd[s][n]).flatten()] for s in services}
        for pair, value in r["cosine"].items():
            a, b = (vec[s] for s in pair.split("/"))
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            want = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
            assert math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12), (part, pair)
        assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in r["self"].values())
