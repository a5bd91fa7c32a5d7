"""The item-level model: token samples regrouped into positions, the loss against a float64
per-code cross-entropy computed by hand, padding invariance, and the service-conditioned heads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_rec.data.positions import code_token_ranges, item_batch, split_positions
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import BOS, CRITIQUE, EOS, EXPLAIN, PAD, SEP, Vocabulary
from moe_rec.model import MoERecForItemPrediction, build_config, model_class

VOCAB = Vocabulary(services=("a", "b", "c"), levels=3, codebook_size=8, dedup_size=4)


def _model(
    seed: int, router_mode: str = "domain_user", dense: bool = False, **fields: object
) -> MoERecForItemPrediction:
    """A tiny item-level model (``fields``: further config, e.g. the item softmax), in eval mode."""
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=VOCAB.size, num_domains=3, num_user_buckets=16, router_mode=router_mode,
        code_token_ranges=code_token_ranges(VOCAB), **fields,
    )  # fmt: skip
    cfg = cfg.dense_twin() if dense else cfg
    model = model_class(cfg)(cfg)
    assert isinstance(model, MoERecForItemPrediction)
    return model.eval()


def _catalogue(g: torch.Generator) -> list[tuple[str, list[int]]]:
    """Four items per service: three random codes of 8 and a dedup code 0..3."""
    return [(s, [*torch.randint(8, (3,), generator=g).tolist(), d]) for s in VOCAB.services for d in range(4)]


def _sample(events: list[tuple[str, list[int]]], user: str, ask: str | None = None) -> dict:
    ids, doms = [BOS], [VOCAB.service_index(events[0][0]) if events else 0]
    for s, codes in events:
        toks = VOCAB.item_tokens(s, codes)
        ids += toks
        doms += [VOCAB.service_index(s)] * len(toks)
    row = {"user": user, "input_ids": ids, "domain_ids": doms}
    if ask is None:
        row["labels"] = [0]  # any labels: a training row
    else:
        row["input_ids"] = ids + [VOCAB.service_token(ask)]
        row["domain_ids"] = doms + [VOCAB.service_index(ask)]
    return row


def _random_events(g: torch.Generator, n: int) -> list[tuple[str, list[int]]]:
    out = []
    for _ in range(n):
        s = VOCAB.services[int(torch.randint(3, (1,), generator=g))]
        out.append(
            (s, [*torch.randint(8, (3,), generator=g).tolist(), int(torch.randint(4, (1,), generator=g))])
        )
    return out


def test_positions_regroup_tokens_by_event() -> None:
    events = [("b", [1, 2, 3, 0]), ("a", [7, 0, 5, 3])]
    row = _sample(events, "u", ask="c")
    tokens, domains, asked, _ = split_positions(row["input_ids"], row["domain_ids"], VOCAB)
    assert tokens[0].tolist() == [BOS] + [PAD] * 4
    assert tokens[1].tolist() == VOCAB.item_tokens("b", [1, 2, 3, 0])
    assert tokens[2].tolist() == VOCAB.item_tokens("a", [7, 0, 5, 3])
    assert domains.tolist() == [1, 1, 0] and asked == VOCAB.service_token("c")
    with pytest.raises(ValueError, match="not whole events"):
        split_positions(row["input_ids"][:-3], row["domain_ids"][:-3], VOCAB)


def test_labels_are_each_events_code_indices() -> None:
    batch = item_batch(
        [_sample([("b", [1, 2, 3, 0]), ("a", [7, 0, 5, 3])], "u"), _sample([("c", [4, 4, 4, 1])], "v")],
        VOCAB,
        16,
    )
    assert batch["labels"][0].tolist() == [[IGNORE_INDEX] * 4, [1, 2, 3, 0], [7, 0, 5, 3]]
    assert batch["labels"][1].tolist() == [[IGNORE_INDEX] * 4, [4, 4, 4, 1], [IGNORE_INDEX] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_is_the_mean_code_cross_entropy_of_the_next_event(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = [_sample(_random_events(g, n), f"u{n}") for n in (1, 4, 6)]
    batch = item_batch(rows, VOCAB, 16)
    model = _model(seed)
    out = model(**batch)
    # reference: the unpadded sample alone, per-code log-softmax in float64, a plain loop
    total, count = 0.0, 0
    for row in rows:
        one = item_batch([row], VOCAB, 16)
        logits = model(**one).logits[0].detach().double()  # (T, P, K)
        labels = one["labels"][0]
        for t in range(labels.shape[0] - 1):
            for p in range(labels.shape[1]):
                target = int(labels[t + 1, p])
                if target == IGNORE_INDEX:
                    continue
                lp = logits[t, p] - torch.logsumexp(logits[t, p], 0)
                total -= float(lp[target])
                count += 1
    assert count == 4 * (1 + 4 + 6)  # every event, the first one predicted from [BOS]
    assert out.lm_loss.item() == pytest.approx(total / count, rel=1e-5)  # fp32 against float64 sums
    assert out.loss.item() > out.lm_loss.item()  # the routers' auxiliary loss is added
    out.loss.backward()
    assert (
        model.code_proj.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0
    )


@pytest.mark.parametrize("router_mode", ["token", "domain", "domain_user"])
def test_last_position_logits_do_not_depend_on_padding(router_mode: str) -> None:
    g = torch.Generator().manual_seed(7)
    rows = [_sample(_random_events(g, n), f"u{n}", ask="b") for n in (0, 2, 5)]
    model = _model(3, router_mode)
    batch = item_batch(rows, VOCAB, 16, left_pad=True)
    if router_mode != "domain_user":
        batch.pop("user_ids")
    together = model(**batch, logits_to_keep=1).logits[:, -1]
    for i, row in enumerate(rows):
        one = item_batch([row], VOCAB, 16, left_pad=True)
        if router_mode != "domain_user":
            one.pop("user_ids")
        # fp32 both: the batch's padding changes the summation order (measured <= 1.2e-6)
        torch.testing.assert_close(
            together[i], model(**one, logits_to_keep=1).logits[0, -1], atol=1e-5, rtol=1e-5
        )


def test_heads_read_the_asked_service_and_mask_short_code_ranges() -> None:
    model = _model(4)
    row = _sample([("a", [1, 2, 3, 0])], "u", ask="a")
    other = {**row, "input_ids": row["input_ids"][:-1] + [VOCAB.service_token("c")]}
    la = model(**item_batch([row], VOCAB, 16, left_pad=True), logits_to_keep=1).logits[0, -1]
    lc = model(**item_batch([other], VOCAB, 16, left_pad=True), logits_to_keep=1).logits[0, -1]
    assert not torch.allclose(la, lc)
    assert torch.isinf(la[3, 4:]).all() and torch.isfinite(la[3, :4]).all()  # dedup: 4 of K_max = 8
    assert torch.isfinite(la[:3]).all()
    assert la.abs()[torch.isfinite(la)].max() <= 1 / model.config.item_head_temperature + 1e-4  # cosine / T


def test_dense_twin_is_item_level_too() -> None:
    model = _model(5, dense=True)
    assert all(not layer.is_moe for layer in model.model.layers)
    out = model(**item_batch([_sample([("a", [1, 2, 3, 0]), ("b", [0, 0, 0, 0])], "u")], VOCAB, 16))
    assert out.aux_loss is None and math.isfinite(out.loss.item())


@pytest.mark.parametrize("balance", ["positions", "services"])
def test_item_softmax_loss_is_the_cross_entropy_over_the_target_services_items(balance: str) -> None:
    """item_loss='items': a float64 loop over every scored position and every item of its service;
    the mean over positions, or with item_loss_balance='services' the mean of each service's mean."""
    model = _model(8, "token", item_loss="items", item_loss_balance=balance)
    g = torch.Generator().manual_seed(9)
    catalogue = _catalogue(g)
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    rows = [
        _sample([catalogue[i] for i in picks], f"u{j}")
        for j, picks in enumerate([[0, 5, 9, 1], [11, 2], [7]])
    ]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    out = model(**batch)
    by_service: dict[int, list[float]] = {}  # each position's loss, by the service it asks for
    for row in rows:
        one = item_batch([row], VOCAB, 16)
        one.pop("user_ids")
        with torch.no_grad():
            z = model(**one).logits[0].double()  # (T, P, K)
        tokens = one["item_tokens"][0]
        for t in range(tokens.shape[0] - 1):
            service = int(tokens[t + 1, 0])
            nxt = one["labels"][0, t + 1].tolist()
            logits = [sum(float(z[t, p, c]) for p, c in enumerate(codes)) / 4 for s, codes in catalogue
                      if VOCAB.service_token(s) == service]  # fmt: skip
            target = sum(float(z[t, p, c]) for p, c in enumerate(nxt)) / 4  # the mean of the P = 4 codes
            by_service.setdefault(service, []).append(math.log(sum(math.exp(x) for x in logits)) - target)
    losses = [x for xs in by_service.values() for x in xs]
    assert sorted(len(xs) for xs in by_service.values()) == [2, 2, 3]  # unequal: the modes differ
    if balance == "positions":
        want = sum(losses) / len(losses)
    else:
        want = sum(sum(xs) / len(xs) for xs in by_service.values()) / len(by_service)
    assert out.lm_loss.item() == pytest.approx(want, rel=1e-5)  # fp32 against float64 sums
    with pytest.raises(ValueError, match="set_train_catalogue"):
        MoERecForItemPrediction(model.config)(**batch)
    with pytest.raises(ValueError, match="item_loss_balance 'service' not in"):
        _model(8, item_loss="items", item_loss_balance="service")


@pytest.mark.gpu
def test_item_softmax_trains_on_the_gpu_after_the_catalogue_was_set_on_the_cpu(cuda: torch.device) -> None:
    """The trainer sets the catalogue on the CPU and DeepSpeed then moves the model to the GPU:
    there the loss and its gradients equal the CPU's (every item of a service in the softmax, so
    no random draw differs)."""
    g = torch.Generator().manual_seed(21)
    catalogue = _catalogue(g)
    model = _model(13, "token", item_loss="items", item_embedding=True, num_items=len(catalogue))
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.5)
    rows = [_sample(_random_events(g, n), f"u{n}") for n in (5, 2, 7)]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    losses, grads = [], []
    for device in (torch.device("cpu"), cuda):
        model.zero_grad()
        model.to(device)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).lm_loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.item_embed.weight.grad.cpu())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_sampled_item_softmax_covers_the_whole_service_when_it_draws_every_item() -> None:
    """With far more draws than items every item of the service is drawn: the sampled loss equals the
    full softmax; with few draws it is smaller (fewer terms in the normaliser), never larger."""
    g = torch.Generator().manual_seed(10)
    catalogue = _catalogue(g)
    codes = torch.tensor([c for _, c in catalogue])
    tokens = torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    rows = [
        _sample([catalogue[i] for i in picks], f"u{j}") for j, picks in enumerate([[0, 5, 9], [11, 2], [7]])
    ]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    losses = {}
    for negatives in (0, 400, 1):
        model = _model(8, "token", item_loss="items", item_negatives=negatives)
        model.set_train_catalogue(codes, tokens)
        losses[negatives] = model(**batch).lm_loss.item()
    assert losses[400] == pytest.approx(losses[0], rel=1e-5)  # every item drawn: the same sum, reordered
    assert 0 <= losses[1] < losses[0]


def _logit(z: torch.Tensor, q: torch.Tensor, vec: torch.Tensor, row: int | None, codes: list[int]) -> float:
    """An item's logit at one position: the mean of its code logits plus ``query . vector``."""
    term = float(q @ vec[row]) if row is not None else 0.0
    return sum(float(z[p, c]) for p, c in enumerate(codes)) / len(codes) + term


@pytest.mark.parametrize(("text", "prior", "by_service", "service_text", "same_service"),
                         [(False, False, False, False, True), (True, False, False, False, True),
                          (True, True, False, False, True), (True, True, True, False, True),
                          (True, True, True, False, False), (True, True, False, True, True)],
                         ids=["vector", "vector+text", "vector+text+prior", "vector+text+prior-by-service",
                              "vector+text+prior-by-service-own-item", "vector+text-by-service+prior"])  # fmt: skip
def test_item_embedding_keys_rows_and_loss(
    text: bool, prior: bool, by_service: bool, service_text: bool, same_service: bool
) -> None:
    """item_embedding: each catalogue item found by its (service, codes) key, a cold item and [BOS]
    by none; the loss adds ``query . vector`` to the mean code logit (a float64 loop again); with
    item_text the vector is the learned one plus the projected text embedding; with
    item_text_prior also ``w x cos`` of the prior's item's text and the candidate's, 0 for that
    item itself: at a position holding a catalogue item, the last item of the asked service at or
    before it (with item_text_prior_same_service off, the position's own item); with
    item_text_prior_by_service ``w`` is the asked service's, and only the weights of services asked
    where the prior reads an item get a gradient; with service_text each item's text is projected
    with ``W + Delta^s``, s its service."""
    g = torch.Generator().manual_seed(11)
    catalogue = _catalogue(g)
    model = _model(
        12, "token", item_loss="items", item_embedding=True, num_items=len(catalogue),
        item_text=text, item_text_dim=6 if text else 0, item_text_prior=prior,
        item_text_prior_by_service=by_service, service_text=service_text,
        item_text_prior_same_service=same_service,
    )  # fmt: skip
    assert model.item_embed.weight.abs().sum() == 0  # no item term before training
    if service_text:
        assert not model.service_text_proj.any()  # every service starts from the shared projection
        with torch.no_grad():
            model.service_text_proj.normal_(0.0, 0.3, generator=g)
    if by_service:
        with torch.no_grad():
            model.text_prior.copy_(torch.tensor([3.0, -2.0, 7.0]))  # a, b, c: each its own weight
    if text:
        model.set_item_text(torch.randn(len(catalogue), 6, generator=g))
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.5)
    # services a, c, a, b: position 1 (catalogue[2], of a) asks for c, which no earlier item is of;
    # position 2 (catalogue[9], of c) asks for a, whose last item is catalogue[2], the cold target's
    # candidate too; position 3 (the cold item) asks for b
    cold = ("a", [7, 7, 7, 3]) if ("a", [7, 7, 7, 3]) not in catalogue else ("a", [6, 6, 6, 3])
    events = [catalogue[2], catalogue[9], cold, catalogue[5]]
    one = item_batch([_sample(events, "u")], VOCAB, 16)
    one.pop("user_ids")
    position_rows = [-1, 2, 9, -1, 5]  # [BOS], then each event's catalogue row (the cold item has none)
    assert model.position_rows(one["item_tokens"])[0].tolist() == position_rows
    asked = [s for s, _ in events]  # position t asks for event t's service

    def prior_row(t: int) -> int:  # the plain reading of prior_rows
        if position_rows[t] < 0 or not same_service:
            return position_rows[t]
        earlier = [
            position_rows[u]
            for u in range(1, t + 1)
            if position_rows[u] >= 0 and events[u - 1][0] == asked[t]
        ]
        return earlier[-1] if earlier else -1

    own = [prior_row(t) for t in range(len(events))]
    assert own == ([-1, -1, 2, -1] if same_service else [-1, 2, 9, -1])
    if prior:
        queried = torch.tensor([[VOCAB.service_token(s) for s in asked] + [VOCAB.service_token(asked[-1])]])
        assert model.prior_rows(one["item_tokens"], queried)[0, :-1].tolist() == own
    out = model(**one)
    z = out.logits[0].detach().double()
    d = model.config.hidden_size
    q = out.hidden_states[0, :, :d].detach().double()  # the heads' query; with the prior, text follows
    vec = model.item_embed.weight.detach().double()
    if text:
        vec = vec + model.item_text.double() @ model.text_proj.weight.detach().double().T
    if service_text:
        for r, (service, _) in enumerate(catalogue):
            delta = model.service_text_proj[VOCAB.service_index(service)].detach().double()
            vec[r] += delta @ model.item_text[r].double()
    torch.testing.assert_close(model.item_table()[:, :d].double(), vec)

    def text_prior(t: int, row: int | None, asked: str) -> float:
        if not prior or own[t] < 0 or row is None or row == own[t]:
            return 0.0
        a, b = model.item_text[own[t]].double(), model.item_text[row].double()
        w = model.text_prior[VOCAB.service_index(asked)] if by_service else model.text_prior[0]
        return float(w) * float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for t, nxt in enumerate(events):
        service = VOCAB.service_token(nxt[0])

        others = [
            _logit(z[t], q[t], vec, i, c) + text_prior(t, i, nxt[0])
            for i, (s, c) in enumerate(catalogue)
            if VOCAB.service_token(s) == service
        ]
        row = catalogue.index(nxt) if nxt in catalogue else None
        target = _logit(z[t], q[t], vec, row, nxt[1]) + text_prior(t, row, nxt[0])
        # a cold target has no vector and is not in the normaliser (training targets always are)
        total += math.log(sum(math.exp(x) for x in others)) - target
    assert out.lm_loss.item() == pytest.approx(total / len(events), rel=1e-5)  # fp32 against float64 sums
    if by_service:  # the prior reads an item where position 2 asks for a (same service) or where
        # position 1 asks for c, then position 2 for a (its own item, whatever the service)
        with torch.no_grad():  # large learned vectors make the own item take all of the softmax
            model.item_embed.weight.zero_()
        model(**one).lm_loss.backward()
        read = [bool(model.text_prior.grad[VOCAB.service_index(s)].abs() > 0) for s in VOCAB.services]
        assert read == ([True, False, False] if same_service else [True, False, True])


def test_items_kept_out_of_training_are_no_negatives_and_keep_a_zero_vector() -> None:
    """set_train_catalogue(..., trained): the loss over a catalogue with cold rows equals the loss
    over the catalogue without them (a second model, same weights), and cold rows get no gradient."""
    g = torch.Generator().manual_seed(13)
    catalogue = _catalogue(g)
    codes = torch.tensor([c for _, c in catalogue])
    tokens = torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    trained = torch.ones(len(catalogue), dtype=torch.bool)
    trained[[1, 4, 10]] = False  # never a target below
    rows = [_sample([catalogue[i] for i in picks], f"u{j}") for j, picks in enumerate([[0, 5, 9], [11, 2]])]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    losses = []
    for keep in (trained, None):
        model = _model(14, "token", item_loss="items")
        if keep is None:
            model.set_train_catalogue(codes[trained], tokens[trained])
        else:
            model.set_train_catalogue(codes, tokens, keep)
        losses.append(model(**batch).lm_loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

    for negatives in (0, 64):
        model = _model(
            15, "token", item_loss="items", item_embedding=True, num_items=len(catalogue),
            item_negatives=negatives,
        ).train()  # fmt: skip
        model.set_train_catalogue(codes, tokens, trained)
        with torch.no_grad():
            model.item_embed.weight.normal_(0, 0.5)
        model(**batch).loss.backward()
        grad = model.item_embed.weight.grad.abs().sum(-1)  # (N,)
        assert (grad[~trained] == 0).all() and (grad[trained] > 0).any()


def test_item_vector_dropout_leaves_out_learned_vectors_in_training_only() -> None:
    """item_vector_dropout: a training forward equals an evaluation forward of the same weights with
    the left-out items' learned vectors zeroed (input positions and candidates alike; their text
    part stays), those rows get no gradient, and evaluation afterwards uses every vector."""
    g = torch.Generator().manual_seed(16)
    catalogue = _catalogue(g)
    codes = torch.tensor([c for _, c in catalogue])
    tokens = torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    rows = [
        _sample([catalogue[i] for i in picks], f"u{j}") for j, picks in enumerate([[0, 5, 9, 3], [11, 2, 6]])
    ]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    text = torch.randn(len(catalogue), 6, generator=g)

    def model() -> MoERecForItemPrediction:
        m = _model(
            17, "token", item_loss="items", item_embedding=True, num_items=len(catalogue), item_text=True,
            item_text_dim=6, item_vector_dropout=0.5, hidden_dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        m.set_item_text(text)
        m.set_train_catalogue(codes, tokens)
        with torch.no_grad():
            m.item_embed.weight.copy_(
                torch.randn(m.item_embed.weight.shape, generator=torch.Generator().manual_seed(18))
            )
        return m

    trained = model().train()
    torch.manual_seed(19)
    loss = trained(**batch).lm_loss
    kept = trained._kept_vectors.clone()
    assert 0 < int(kept.sum()) < len(catalogue)  # some left out, some kept (seeded)
    loss.backward()
    grad = trained.item_embed.weight.grad.abs().sum(-1)
    assert (grad[~kept] == 0).all() and (grad[kept] > 0).any()

    reference = model()  # evaluation mode, the left-out vectors zeroed by hand
    with torch.no_grad():
        reference.item_embed.weight[~kept] = 0.0
        assert reference(**batch).lm_loss.item() == pytest.approx(loss.item(), rel=1e-5)

    trained.eval()
    full = trained.item_embed.weight.detach() + text @ trained.text_proj.weight.detach().T
    torch.testing.assert_close(trained.item_table(), full)


TEXT_VOCAB = Vocabulary(services=("a", "b", "c"), levels=3, codebook_size=8, dedup_size=4, text_size=20)


def _text_sample(user: str = "u") -> dict:
    """[BOS] event [CRITIQUE] 2 words event [EXPLAIN] 2 words [EOS]: a critique steering to an item,
    then the item's narrative."""
    t0 = TEXT_VOCAB.text_offset
    first, target = TEXT_VOCAB.item_tokens("b", [1, 2, 3, 0]), TEXT_VOCAB.item_tokens("b", [4, 5, 6, 1])
    ids = [BOS, *first, CRITIQUE, t0 + 3, t0 + 7, *target, EXPLAIN, t0 + 11, t0 + 19, EOS]
    return {"user": user, "input_ids": ids, "domain_ids": [1] * len(ids), "labels": [0]}


def test_text_positions_and_their_labels() -> None:
    """A text token is a position of its own; item labels only on events, text labels only in the
    narrative (after [EXPLAIN], [EOS] as class text_size); an unknown token is refused by name."""
    row = _text_sample()
    tokens, domains, asked, _ = split_positions(row["input_ids"], row["domain_ids"], TEXT_VOCAB)
    t0 = TEXT_VOCAB.text_offset
    assert tokens[:, 0].tolist() == [BOS, TEXT_VOCAB.service_token("b"), CRITIQUE, t0 + 3, t0 + 7,
                                     TEXT_VOCAB.service_token("b"), EXPLAIN, t0 + 11, t0 + 19, EOS]  # fmt: skip
    assert (tokens[2:5, 1:] == PAD).all() and asked is None and domains.tolist() == [1] * 10
    batch = item_batch([row], TEXT_VOCAB, 16)
    assert batch["text_labels"][0].tolist() == [-100] * 7 + [11, 19, 20]
    item_rows = (batch["labels"][0, :, 0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert item_rows == [1, 5] and batch["labels"][0, 5].tolist() == [4, 5, 6, 1]
    only_target = [IGNORE_INDEX] * len(row["input_ids"])  # token labels: the history's events left out
    only_target[10:14] = row["input_ids"][10:14]  # the target event's codes (tokens 9..13, service first)
    batch = item_batch([{**row, "labels": only_target}], TEXT_VOCAB, 16)
    assert (batch["labels"][0, :, 0] != IGNORE_INDEX).nonzero().flatten().tolist() == [5]
    request = row["input_ids"][:9] + [TEXT_VOCAB.service_token("a")]  # history, critique, asked service
    tokens, _, asked, _ = split_positions(request, [1] * 10, TEXT_VOCAB)
    assert len(tokens) == 5 and asked == TEXT_VOCAB.service_token("a")
    with pytest.raises(ValueError, match=r"\[SEP\]"):
        split_positions([BOS, *row["input_ids"][1:6], SEP], [1] * 7, TEXT_VOCAB)


def test_text_loss_is_the_cross_entropy_of_the_narrative_under_the_tied_head() -> None:
    """lm_loss = item loss + w x text loss; the text loss is the float64 cross-entropy of each
    narrative token (and [EOS]) under the decoder output dotted with the tied embeddings; text
    positions are no catalogue items."""
    torch.manual_seed(21)
    start, stop = TEXT_VOCAB.text_offset, TEXT_VOCAB.size
    catalogue = [("b", [1, 2, 3, 0]), ("b", [4, 5, 6, 1]), ("b", [7, 7, 7, 0]), ("a", [0, 1, 2, 3])]
    cfg = build_config(
        "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, num_user_buckets=16, router_mode="token",
        code_token_ranges=code_token_ranges(TEXT_VOCAB), text_token_range=[start, stop], text_loss_weight=0.5,
        item_loss="items", item_embedding=True, num_items=len(catalogue),
    )  # fmt: skip
    model = model_class(cfg)(cfg).eval()
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]),
        torch.tensor([TEXT_VOCAB.service_token(s) for s, _ in catalogue]),
    )
    batch = item_batch([_text_sample(), _text_sample("v")], TEXT_VOCAB, 16)
    batch.pop("user_ids")
    captured = {}
    model.model.register_forward_hook(lambda mod, args, out: captured.update(hidden=out[0]))
    out = model(**batch)
    h = captured["hidden"][0].detach().double()  # (T, D) the decoder output of sample 0
    emb = model.model.embed_tokens.weight.detach().double()
    head = torch.cat([emb[start:stop], emb[EOS : EOS + 1]])  # (V + 1, D)
    nll = []
    for t, cls in ((6, 11), (7, 19), (8, 20)):  # [EXPLAIN] writes word 11, which writes 19, then [EOS]
        nll.append(float(torch.logsumexp(head @ h[t], 0) - head[cls] @ h[t]))
    assert out.text_loss.item() == pytest.approx(sum(nll) / 3, rel=1e-4)  # both samples alike
    no_text = model(**{k: v for k, v in batch.items() if k != "text_labels"})
    assert out.lm_loss.item() == pytest.approx(no_text.lm_loss.item() + 0.5 * out.text_loss.item(), rel=1e-5)
    assert model.position_rows(batch["item_tokens"])[0].tolist() == [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1]


def _words_model(seed: int, **fields: object) -> tuple[MoERecForItemPrediction, list, torch.Tensor]:
    """A tiny text model with item_words (and the text prior, whose slice the words follow), its
    catalogue and its (N, 4, 3) item words (random text tokens, some [PAD])."""
    g = torch.Generator().manual_seed(seed)
    catalogue = [("b", [1, 2, 3, 0]), ("b", [4, 5, 6, 1]), ("b", [7, 7, 7, 0]), ("a", [0, 1, 2, 3]),
                 ("a", [3, 3, 3, 1]), ("c", [5, 4, 3, 2])]  # fmt: skip
    start, stop = TEXT_VOCAB.text_offset, TEXT_VOCAB.size
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, num_user_buckets=16, router_mode="token",
        code_token_ranges=code_token_ranges(TEXT_VOCAB), text_token_range=[start, stop],
        item_loss="items", item_embedding=True, num_items=len(catalogue), item_text=True, item_text_dim=5,
        item_text_prior=True, item_words=True, item_word_slots=3, **fields,
    )  # fmt: skip
    model = model_class(cfg)(cfg).eval()
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]),
        torch.tensor([TEXT_VOCAB.service_token(s) for s, _ in catalogue]),
    )
    model.set_item_text(torch.randn(len(catalogue), 5, generator=g))
    words = start + torch.randint(stop - start, (len(catalogue), 4, 3), generator=g)
    words[torch.rand(words.shape, generator=g) < 0.3] = PAD
    words[0, 1] = PAD  # an empty field
    model.set_item_words(words)
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.1)
        model.word_weight.weight.normal_(0, 0.3)
    return model, catalogue, words


def test_item_words_add_each_fields_term_to_the_item_logits_by_hand() -> None:
    """item_words: word_bags is the plain per-field mean (an empty field zero); the loss equals a
    float64 loop whose item logit is the mean code logit + query . vector + the text prior +
    sum_f sum_s a_f(h_s) cos(e_s, bag_f) over the critique's two words s, normalised over the
    target's service only (the critique sample's target is of service b, whose three items are
    the only candidates)."""
    from moe_rec.model.item_model import reference_word_bags

    model, catalogue, words = _words_model(31)
    d = model.config.hidden_size
    emb = model.model.embed_tokens.weight.detach().double()
    bags = reference_word_bags(words, emb, PAD)
    rows = torch.arange(len(catalogue))
    torch.testing.assert_close(model.word_bags(rows).double(), bags)
    assert bags[0, 1].abs().sum() == 0
    assert model.word_bags(torch.tensor([-1])).abs().sum() == 0  # no item: no words
    row = _text_sample()
    labels = [IGNORE_INDEX] * len(row["input_ids"])
    labels[10:14] = row["input_ids"][10:14]  # only the target after the critique is a label
    batch = item_batch([{**row, "labels": labels}], TEXT_VOCAB, 16)
    batch.pop("user_ids")
    batch.pop("text_labels")
    captured = {}
    model.model.register_forward_hook(lambda mod, args, out: captured.update(hidden=out[0]))
    out = model(**batch)
    t = 4  # the critique's last word, which predicts the target (position 5)
    z = out.logits[0, t].detach().double()
    q = out.hidden_states[0, t, :d].detach().double()
    h = captured["hidden"][0].detach().double()  # (T, D) decoder outputs
    gate_w, gate_b = model.word_weight.weight.detach().double(), model.word_weight.bias.detach().double()
    critique = [(3, row["input_ids"][7]), (4, row["input_ids"][8])]  # (position, token): [CRITIQUE] breaks
    unit = [bags[i] / bags[i].norm(dim=-1, keepdim=True).clamp_min(1e-12) for i in range(len(catalogue))]
    vec = (
        model.item_embed.weight.detach().double()
        + model.item_text.double() @ model.text_proj.weight.detach().double().T
    )

    def logit(i: int) -> float:  # a text position has no own item: no text prior
        words_term = 0.0
        for s, token in critique:
            a = gate_w @ h[s] + gate_b  # (4,) the word's weight per field
            e = emb[token] / emb[token].norm()
            words_term += sum(float(a[f] * (e @ unit[i][f])) for f in range(4))
        return _logit(z, q, vec, i, catalogue[i][1]) + words_term

    b_items = [i for i, (s, _) in enumerate(catalogue) if s == "b"]
    expect = math.log(sum(math.exp(logit(i)) for i in b_items)) - logit(1)
    assert out.lm_loss.item() == pytest.approx(expect, rel=1e-4, abs=1e-6)  # fp32 against float64
    plain = math.log(sum(math.exp(_logit(z, q, vec, i, catalogue[i][1])) for i in b_items))
    assert abs(plain - _logit(z, q, vec, 1, catalogue[1][1]) - expect) > 0.1  # the words' term matters
    # an item position's own-item correction reads the text prior's part only: its cosine is 1
    own = model.own_item_term(out.hidden_states[0, 1].detach(), torch.tensor(0))
    assert float(own) == pytest.approx(-float(model.text_prior), rel=1e-5)
    assert out.hidden_states[0, :3, d + 5 :].abs().sum() == 0  # no critique word there: no words term


def test_item_words_train_the_shared_text_embeddings_and_the_word_weights() -> None:
    """The gradient of the item loss reaches the input embedding of a subword that only an item's
    words hold (no position reads it) and the word weights a_f; [PAD] gets none."""
    model, _, words = _words_model(32)
    row = _text_sample()
    labels = [IGNORE_INDEX] * len(row["input_ids"])
    labels[10:14] = row["input_ids"][10:14]
    batch = item_batch([{**row, "labels": labels}], TEXT_VOCAB, 16)
    batch.pop("user_ids")
    batch.pop("text_labels")
    model.train()
    model(**batch).lm_loss.backward()
    grad = model.model.embed_tokens.weight.grad
    read = set(row["input_ids"])
    only_words = sorted(set(words[:3].flatten().tolist()) - read - {PAD})  # service b's items' words
    assert only_words and all(float(grad[i].abs().sum()) > 0 for i in only_words)
    assert float(grad[PAD].abs().sum()) == 0
    assert float(model.word_weight.weight.grad.abs().sum()) > 0


def test_item_words_input_adds_the_mean_field_vector_to_item_positions_only() -> None:
    """item_words_input: an item position's input gains sqrt(D) x the mean of its field vectors;
    [BOS] and text positions are unchanged."""
    model, _, _ = _words_model(33, item_words_input=True)
    batch = item_batch([_text_sample()], TEXT_VOCAB, 16)
    tokens = batch["item_tokens"]
    with_words = model.embed_positions(tokens).detach()
    model.config.item_words_input = False
    without = model.embed_positions(tokens).detach()
    rows = model.position_rows(tokens)
    extra = model.word_bags(rows).mean(-2).detach() * math.sqrt(model.config.hidden_size)
    torch.testing.assert_close(with_words - without, extra)
    assert rows[0].tolist() == [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1]
    assert float(extra[0, 1].abs().sum()) > 0 and float(extra[0, 2].abs().sum()) == 0


def test_item_words_config_and_table_are_checked() -> None:
    """item_words needs item_embedding, text tokens and slots; item_words_input needs item_words;
    set_item_words refuses a wrong shape and a token that is no text token."""
    base = dict(vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
                item_loss="items", item_embedding=True, num_items=6)  # fmt: skip
    text = [TEXT_VOCAB.text_offset, TEXT_VOCAB.size]
    with pytest.raises(ValueError, match="item_words needs"):
        build_config("tiny", **base, item_words=True, item_word_slots=3)  # no text tokens
    with pytest.raises(ValueError, match="item_words needs"):
        build_config("tiny", **base, text_token_range=text, item_words=True)  # no slots
    with pytest.raises(ValueError, match="item_words_input needs"):
        build_config("tiny", **base, text_token_range=text, item_words_input=True)
    model, _, words = _words_model(34)
    with pytest.raises(ValueError, match="shape"):
        model.set_item_words(words[:, :, :2])
    bad = words.clone()
    bad[0, 0, 0] = VOCAB.service_token("a")
    with pytest.raises(ValueError, match="text tokens"):
        model.set_item_words(bad)


def test_critique_loss_weight_scales_only_the_position_that_reads_a_critique() -> None:
    """critique_loss_weight w: with the history event and the critique's target both labels (two
    scored positions), the loss is (l_history + w x l_target) / 2, l_target the loss of the target
    alone; w must be > 0 and needs text tokens."""
    row = _text_sample()
    only_target = [IGNORE_INDEX] * len(row["input_ids"])
    only_target[10:14] = row["input_ids"][10:14]
    both = list(only_target)
    both[2:5] = row["input_ids"][2:5]  # the first event's codes (its tokens 1..4, service first)
    losses = {}
    for w in (1.0, 4.0):
        model, _, _ = _words_model(35, critique_loss_weight=w)
        for name, labels in (("target", only_target), ("both", both)):
            batch = item_batch([{**row, "labels": labels}], TEXT_VOCAB, 16)
            batch.pop("user_ids")
            batch.pop("text_labels")
            losses[name, w] = model(**batch).lm_loss.item()
    assert losses["target", 4.0] == pytest.approx(4 * losses["target", 1.0], rel=1e-5)
    history = 2 * losses["both", 1.0] - losses["target", 1.0]
    assert losses["both", 4.0] == pytest.approx((history + 4 * losses["target", 1.0]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="critique_loss_weight"):
        _model(36, item_loss="items", critique_loss_weight=2.0)  # no text tokens
    with pytest.raises(ValueError, match="critique_loss_weight"):
        _words_model(36, critique_loss_weight=0.0)


def _phrase_model(
    seed: int, words: torch.Tensor, terms: torch.Tensor | None = None, **fields: object
) -> MoERecForItemPrediction:
    """A tiny text model with item_words and item_phrases over the given (N, 4, L) words (and with
    ``terms`` (N, K, L'), item_terms); N items of service b (distinct codes)."""
    n = words.shape[0]
    if terms is not None:
        fields.update(item_terms=True, item_term_shape=list(terms.shape[1:]))
    catalogue = [("b", [i % 8, i // 8, 0, 0]) for i in range(n)]
    start, stop = TEXT_VOCAB.text_offset, TEXT_VOCAB.size
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, num_user_buckets=16, router_mode="token",
        code_token_ranges=code_token_ranges(TEXT_VOCAB), text_token_range=[start, stop],
        item_loss="items", item_embedding=True, num_items=n, item_words=True,
        item_word_slots=words.shape[-1], item_phrases=True, **fields,
    )  # fmt: skip
    model = model_class(cfg)(cfg).eval()
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]),
        torch.tensor([TEXT_VOCAB.service_token(s) for s, _ in catalogue]),
    )
    model.set_item_words(words)
    if terms is not None:
        model.set_item_terms(terms)
    return model


def _phrase_words(fields: list[list[list[int]]], width: int = 3) -> torch.Tensor:
    """(N, 4, width) item words from per item per field text-token offsets (title left empty)."""
    t0 = TEXT_VOCAB.text_offset
    out = torch.full((len(fields), 4, width), PAD, dtype=torch.long)
    for n, item in enumerate(fields):
        for f, ids in enumerate(item):
            out[n, f, : len(ids)] = torch.tensor(ids) + t0
    return out


def _critique_batch(words: list[int]) -> dict:
    """One request: [BOS] an event of b, [CRITIQUE] the words (text-token offsets), asking b."""
    t0 = TEXT_VOCAB.text_offset
    ids = [BOS, *TEXT_VOCAB.item_tokens("b", [1, 2, 3, 0]), CRITIQUE, *[t0 + w for w in words]]
    ids.append(TEXT_VOCAB.service_token("b"))
    batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
    return {k: v for k, v in batch.items() if k in ("item_tokens", "domain_ids", "attention_mask")}


def test_phrase_match_picks_the_named_brand_not_one_sharing_a_subword() -> None:
    """Brands "sprint now" (1 2), "hop now" (3 2), "sprint go" (1 4); categories "gloss" (5) and
    "lip gloss" (6 5). A critique "... sprint now ... lip gloss" matches exactly the items of brand
    "sprint now" and category "lip gloss" (not "gloss" inside it), so only they get the phrase
    term, each its field's weight; one that names no phrase gives none."""
    words = _phrase_words([
        [[1, 2], [5], [9]], [[3, 2], [6, 5], [9]], [[1, 4], [5], [10]], [[1, 2], [6, 5], [10]],
        [[3, 2], [7], [9]],
    ])  # fmt: skip
    model = _phrase_model(41, words)
    ids, field, lengths, member = model.phrases()
    assert len(ids) == 3 + 3 + 2 and lengths.tolist().count(2) == 4  # brands, categories, bands
    assert member.sum(-1).tolist() == [3.0] * 5
    with torch.no_grad():  # a field weight of 1 for brands, 2 for categories, from the bias alone
        model.phrase_weight.weight.zero_()
        model.phrase_weight.bias.copy_(torch.tensor([1.0, 2.0, 0.0]))
        model.phrase_q.weight.zero_()
    batch = _critique_batch([8, 1, 2, 11, 6, 5, 8])
    out = model(**batch, logits_to_keep=1)
    table = model.item_table()
    u = member.shape[1]
    term = out.hidden_states[0, -1, -u:] @ table[:, -u:].T  # (N,) the phrase term per item
    assert term.tolist() == pytest.approx([1.0, 2.0, 0.0, 3.0, 0.0])
    plain = model(**_critique_batch([8, 2, 5, 4, 8]), logits_to_keep=1)  # "now", "gloss", "go" alone
    term = plain.hidden_states[0, -1, -u:] @ table[:, -u:].T
    assert term.tolist() == pytest.approx([2.0, 0.0, 2.0, 0.0, 0.0])  # "gloss" is a category: those


def test_item_terms_are_phrases_of_their_own_field_held_by_every_item_naming_them() -> None:
    """Terms "wood" (7), "red oak" (8 9) and "sprint" (1, also the first subword of a brand): an item
    holds each of its terms, so "red oak" counts for the two items that have it, with the terms'
    field weight; a term spelled like part of a brand is a phrase of its own field; "oak" alone
    matches nothing."""
    words = _phrase_words([[[1, 2], [5], [9]], [[3, 2], [5], [9]], [[1, 2], [6], [10]]])
    terms = _phrase_words([[[7], [8, 9]], [[8, 9], [1]], []])[:, :2, :2]  # (N, K=2, L'=2)
    model = _phrase_model(43, words, terms)
    ids, field, lengths, member = model.phrases()
    assert field.tolist().count(3) == 3 and len(ids) == 2 + 2 + 2 + 3  # brands, categories, bands, terms
    t0 = TEXT_VOCAB.text_offset
    term = {tuple(int(i) - t0 for i in row if int(i) != PAD): u for u, row in enumerate(ids) if field[u] == 3}
    assert member[:, term[(8, 9)]].tolist() == [1.0, 1.0, 0.0] and member[:, term[(1,)]].tolist() == [
        0.0,
        1.0,
        0.0,
    ]
    assert member.sum(-1).tolist() == [5.0, 5.0, 3.0]  # three fields and each item's terms
    assert model.phrase_weight.out_features == 4
    with pytest.raises(ValueError, match="item terms of shape"):
        model.set_item_terms(terms[:, :1])
    with torch.no_grad():  # field weights 1, 2, 0 and 5 for terms, from the bias alone
        model.phrase_weight.weight.zero_()
        model.phrase_weight.bias.copy_(torch.tensor([1.0, 2.0, 0.0, 5.0]))
        model.phrase_q.weight.zero_()
    table = model.item_table()
    u = member.shape[1]
    for critique, expect in (([11, 8, 9, 11], [5.0, 5.0, 0.0]), ([9, 11], [0.0, 0.0, 0.0]),
                             ([1, 2, 11, 7], [6.0, 0.0, 1.0])):  # fmt: skip
        out = model(**_critique_batch(critique), logits_to_keep=1)
        assert (out.hidden_states[0, -1, -u:] @ table[:, -u:].T).tolist() == pytest.approx(expect)


def test_phrase_match_stays_inside_one_critique() -> None:
    """A phrase split by a non-text position ([CRITIQUE], an event) is no match; the phrase term of
    a request without a critique is zero."""
    words = _phrase_words([[[1, 2], [5], [9]], [[3], [6], [9]]])
    model = _phrase_model(42, words)
    with torch.no_grad():
        model.phrase_weight.bias.fill_(1.0)
    u = model.phrases()[3].shape[1]
    t0 = TEXT_VOCAB.text_offset
    ids = [BOS, CRITIQUE, t0 + 1, *TEXT_VOCAB.item_tokens("b", [1, 2, 3, 0]), CRITIQUE, t0 + 2]
    ids.append(TEXT_VOCAB.service_token("b"))
    batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
    batch = {k: v for k, v in batch.items() if k in ("item_tokens", "domain_ids", "attention_mask")}
    out = model(**batch)
    assert out.hidden_states[0, :, -u:].abs().sum() == 0
    no_critique = model(**_critique_batch([])).hidden_states
    assert no_critique[0, :, -u:].abs().sum() == 0


@pytest.mark.parametrize(
    "seed,named,terms",
    [(0, False, False), (1, False, True), (2, True, False), (3, True, True), (4, True, True)],
)
def test_critique_phrases_match_the_plain_loop_on_random_inputs(seed: int, named: bool, terms: bool) -> None:
    """critique_phrases against reference_phrase_query: random item words over 5 subwords (so
    phrases overlap and nest), with ``terms`` 0-3 random terms per item as a fourth field, random
    critiques in a batch of two after random items, random weights; with critique_named_previous
    the phrases each position's previous item holds are found by a loop over the item words."""
    from moe_rec.model.item_model import reference_phrase_query

    g = torch.Generator().manual_seed(seed)

    def draw() -> list[int]:
        return [int(x) for x in torch.randint(5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)]

    items = [[draw() for _ in range(3)] for _ in range(12)]
    item_terms = [[draw() for _ in range(int(torch.randint(4, (1,), generator=g)))] for _ in range(12)]
    words = _phrase_words(items)
    term_table = _phrase_words(item_terms)[:, :3] if terms else None  # (N, K=3, 3)
    model = _phrase_model(seed, words, term_table, item_phrase_rank=4, critique_named_previous=named)
    layers = [model.phrase_weight, model.phrase_q, model.phrase_k]
    layers += [model.named_previous_weight] if named else []
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0, 0.5, generator=g)
            if layer.bias is not None:
                layer.bias.normal_(0, 0.5, generator=g)
    t0 = TEXT_VOCAB.text_offset
    rows, events = [], []
    for _ in range(2):
        critique = torch.randint(6, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        second = torch.randint(6, (3,), generator=g).tolist()
        picked = torch.randint(
            12, (3,), generator=g
        ).tolist()  # catalogue items i: codes [i % 8, i // 8, 0, 0]
        events.append(picked)
        item = [TEXT_VOCAB.item_tokens("b", [i % 8, i // 8, 0, 0]) for i in picked]
        ids = [BOS, *item[0], CRITIQUE, *[t0 + w for w in critique]]
        ids += [*item[1], CRITIQUE, *[t0 + w for w in second]]
        ids += [*item[2], EXPLAIN, *[t0 + w for w in critique], EOS]
        ids.append(TEXT_VOCAB.service_token("b"))  # a narrative repeats the critique: no critique there
        rows.append({"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)})
    batch = item_batch(rows, TEXT_VOCAB, 64)
    tokens = batch["item_tokens"]
    hidden = torch.randn(*tokens.shape[:2], model.config.hidden_size, generator=g)
    got = model.critique_phrases(tokens, hidden, batch["query_services"])
    ids, field, _, _ = model.phrases()
    phrases = [(int(f), [int(i) for i in row if int(i) != PAD]) for f, row in zip(field, ids, strict=True)]
    nf = model.phrase_fields
    assert nf == 3 + terms and (not terms or 3 in field.tolist())
    matched = named_matches = 0
    for b in range(tokens.shape[0]):
        first = tokens[b, :, 0].tolist()
        is_word, opener = [], None  # a critique word: a subword in a run opened by [CRITIQUE]
        held, prev, seen = [], None, 0  # per position the phrases of the last item at or before it
        for x in first:
            text = TEXT_VOCAB.text_offset <= x < TEXT_VOCAB.size
            opener = opener if text else x
            is_word.append(text and opener == CRITIQUE)
            if x == TEXT_VOCAB.service_token("b") and seen < len(events[b]):  # an event (the 4th: the ask)
                prev, seen = events[b][seen], seen + 1
            holds = [] if prev is None else [*items[prev], *(item_terms[prev] if terms else [])]
            held.append({u for u, (f, p) in enumerate(phrases)
                         for i, h in enumerate(holds) if min(i, 3) == f and p == [w + t0 for w in h]})  # fmt: skip
        with torch.no_grad():
            lin = model.phrase_weight(hidden[b])
            q = model.phrase_q(hidden[b]).view(len(first), nf, -1)
            k = model.phrase_k(hidden[b]).view(len(first), nf, -1)
            d = model.named_previous_weight(hidden[b]) if named else None
        expect = reference_phrase_query(first, is_word, phrases, lin, q, k, d, held)
        torch.testing.assert_close(got[b].detach(), expect, rtol=1e-5, atol=1e-5)
        matched += int((expect != 0).sum())
        if named:  # matches of phrases the previous item holds, where d_f counts
            without = reference_phrase_query(first, is_word, phrases, lin, q, k)
            named_matches += int((expect != without).sum())
    assert matched > 0  # the inputs do match some phrases
    assert named_matches > 0 or not named


def test_critique_field_query_adds_the_decoder_query_at_critique_words_only() -> None:
    """critique_field_query: at a critique word t the words part gains W_f h_t per field (zero at
    the start: the model scores as without it), and nothing at other positions (the narrative's
    words are text but no critique)."""
    model, _, _ = _words_model(34, critique_field_query=True)
    batch = item_batch([_text_sample()], TEXT_VOCAB, 16)
    tokens = batch["item_tokens"]
    hidden = torch.randn(
        *tokens.shape[:2], model.config.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    before = model.critique_words(tokens, hidden)
    assert float(model.field_query.weight.abs().sum()) == 0
    with torch.no_grad():
        model.field_query.weight.normal_(0, 0.2)
        extra = model.field_query(hidden)  # (B, T, F x D)
    after = model.critique_words(tokens, hidden).detach()
    text = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    text[0, 3:5] = True  # _text_sample's two critique words (7-8 are the narrative's)
    assert (
        (tokens[0, 3:5, 0] >= TEXT_VOCAB.text_offset) & (tokens[0, 7:9, 0] >= TEXT_VOCAB.text_offset)
    ).all()
    torch.testing.assert_close(after[text], (before + extra)[text].detach())
    torch.testing.assert_close(after[~text], before[~text].detach())
    assert float(after[~text].abs().sum()) == 0


def test_price_bins_are_quantiles_of_the_service_prices() -> None:
    """price_bins: the share of the prices strictly below, times Q, floored; equal prices one bin,
    no price -1."""
    from moe_rec.data.item_words import price_bins

    prices = [10.0, None, 1.0, 5.0, 5.0, 7.0, 20.0, 3.0]
    assert price_bins(prices, 4) == [2, -1, 0, 1, 1, 2, 3, 0]  # 7 prices: 4 x below // 7
    assert price_bins([None, None], 4) == [-1, -1]


def _price_model(
    seed: int, bins: list[int], services: list[str], **fields: object
) -> MoERecForItemPrediction:
    """A tiny text model with item_words, item_price_bins=4 and ``fields``: item i of ``services[i]`` (distinct
    codes), its price bin ``bins[i]``, random item words."""
    n = len(bins)
    catalogue = [(s, [i % 8, i // 8, 0, 0]) for i, s in enumerate(services)]
    start, stop = TEXT_VOCAB.text_offset, TEXT_VOCAB.size
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, num_user_buckets=16, router_mode="token",
        code_token_ranges=code_token_ranges(TEXT_VOCAB), text_token_range=[start, stop],
        item_loss="items", item_embedding=True, num_items=n, item_words=True, item_word_slots=2,
        **{"item_price_bins": 4, **fields},
    )  # fmt: skip
    model = model_class(cfg)(cfg).eval()
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]),
        torch.tensor([TEXT_VOCAB.service_token(s) for s, _ in catalogue]),
    )
    g = torch.Generator().manual_seed(seed)
    model.set_item_words(start + torch.randint(stop - start, (n, 4, 2), generator=g))
    model.set_item_price_bins(torch.tensor(bins))
    return model


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_critique_ordinals_match_the_plain_loop_on_random_inputs(seed: int) -> None:
    """critique_ordinals against reference_bin_query, field by field (price; with item_amounts size
    over its kind blocks and pack; with ordinal_word_votes the weights summed over the critique's
    words so far, in a plain loop): items of two services with random bins (some without a price or
    size), sequences mixing both services with critiques, left padding, random weights; the previous
    item is the last one of the asked service, so asking a or b changes it."""
    from moe_rec.data.item_words import PACK_BINS, SIZE_BLOCKS
    from moe_rec.model.item_model import reference_bin_query

    g = torch.Generator().manual_seed(seed)
    n = 16
    services = ["a" if i % 2 else "b" for i in range(n)]
    bins = torch.randint(-1, 4, (n,), generator=g).tolist()
    amounts, votes = seed % 2 == 1, seed >= 3
    model = _price_model(seed, bins, services, item_amounts=amounts, ordinal_word_votes=votes)
    fields = [(bins, (4,))]
    if amounts:  # sizes in few bins of each kind's block, so that some share a kind and some a bin
        starts = [0, SIZE_BLOCKS[0], SIZE_BLOCKS[0] + SIZE_BLOCKS[1]]
        size = [-1 if k < 0 else starts[k] + int(torch.randint(3, (1,), generator=g))
                for k in torch.randint(-1, 3, (n,), generator=g).tolist()]  # fmt: skip
        pack = torch.randint(PACK_BINS, (n,), generator=g).tolist()
        model.set_item_amount_bins(torch.tensor([size, pack]).T)
        fields += [(size, SIZE_BLOCKS), (pack, (PACK_BINS,))]
    with torch.no_grad():
        for layer in model.ordinal_layers():
            layer.weight.normal_(0, 0.5, generator=g)
            layer.bias.normal_(0, 0.5, generator=g)
    t0 = TEXT_VOCAB.text_offset
    rows = []
    for k in range(3):
        ids = [BOS]
        for _ in range(3 + k):
            i = int(torch.randint(n, (1,), generator=g))
            ids += TEXT_VOCAB.item_tokens(services[i], [i % 8, i // 8, 0, 0])
            if bool(torch.rand(1, generator=g) < 0.5):
                ids += [CRITIQUE, *[t0 + int(w) for w in torch.randint(6, (2,), generator=g)]]
        ids.append(TEXT_VOCAB.service_token("a" if k % 2 else "b"))
        rows.append({"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)})
    batch = item_batch(rows, TEXT_VOCAB, 64, left_pad=True)
    tokens = batch["item_tokens"]
    hidden = torch.randn(*tokens.shape[:2], model.config.hidden_size, generator=g)
    asked = torch.randint(
        TEXT_VOCAB.service_token("a"), TEXT_VOCAB.service_token("c") + 1, tokens.shape[:2], generator=g
    )
    got = model.critique_ordinals(tokens, hidden, asked)
    assert got.shape[-1] == sum(sum(blocks) for _, blocks in fields)
    all_rows = model.position_rows(tokens)
    checked = 0
    for b in range(tokens.shape[0]):
        first = tokens[b, :, 0].tolist()
        is_word = [TEXT_VOCAB.text_offset <= x < TEXT_VOCAB.size for x in first]
        parts = []
        for (field_bins, blocks), layer in zip(fields, model.ordinal_layers(), strict=True):
            with torch.no_grad():
                coef = layer(hidden[b])
            if votes:  # each position: the sum over the critique's words up to it (a run of text)
                summed = torch.zeros_like(coef)
                for t in range(len(first)):
                    s = t
                    while s >= 0 and is_word[s]:
                        summed[t] += coef[s]
                        s -= 1
                coef = summed
            parts.append(reference_bin_query(
                first, is_word, all_rows[b].tolist(), first, asked[b].tolist(), field_bins, coef.double(),
                blocks,
            ))  # fmt: skip
        torch.testing.assert_close(got[b].detach().double(), torch.cat(parts, -1), rtol=1e-5, atol=1e-5)
        checked += sum(is_word)
    assert checked > 0


def test_a_bigger_size_after_a_small_item_ranks_bigger_sizes_of_its_kind_first() -> None:
    """item_amounts: after an item of 2 oz and a critique, a weight on "above the previous item's
    size bin" gives exactly the items of a larger amount the size term, not counts, size words or
    items without a size; a weight on "below the previous pack" after a pack of 6 gives the smaller
    packs theirs; without a critique no term."""
    from moe_rec.data.item_attributes import Size
    from moe_rec.data.item_words import PACK_BINS, SIZE_BLOCKS, pack_bin, size_bin

    sizes = [Size("amount", 2.0), Size("amount", 8.0), Size("amount", 0.5), Size("count", 60.0),
             Size("word", 5), None, Size("amount", 2.05), Size("amount", 16.0)]  # fmt: skip
    packs = [6, 1, 2, 12, None, 3, 6, 24]
    model = _price_model(7, [0] * 8, ["b"] * 8, item_amounts=True)
    model.set_item_amount_bins(
        torch.tensor([[size_bin(s), pack_bin(p)] for s, p in zip(sizes, packs, strict=True)])
    )
    rel = {"below": 0, "same": 1, "above": 2}
    q_size, q_pack = sum(SIZE_BLOCKS), PACK_BINS
    with torch.no_grad():
        model.size_weight.bias[q_size + rel["above"]] = 5.0
        model.pack_weight.bias[q_pack + rel["below"]] = 2.0
    after = _ordinal_term(model, 0, True, q_size + q_pack)  # item 0: 2 oz, a pack of 6
    # bigger: 8 oz and 16 oz (2.05 oz shares 2 oz's bin; a count, a word, no size: another kind);
    # a smaller pack: 1, 2, unstated (one), 3
    assert after.tolist() == pytest.approx([0.0, 7.0, 2.0, 0.0, 2.0, 2.0, 0.0, 5.0])
    assert _ordinal_term(model, 0, False, q_size + q_pack).abs().sum() == 0


def _ordinal_term(model: MoERecForItemPrediction, prev: int, critique: bool, width: int) -> torch.Tensor:
    """(N,) each item's term from the last ``width`` parts of the query (the ordinal fields') for a
    request of service b after item ``prev`` (codes ``[prev % 8, prev // 8, 0, 0]``), with a
    two-word critique or without."""
    t0 = TEXT_VOCAB.text_offset
    ids = [BOS, *TEXT_VOCAB.item_tokens("b", [prev % 8, prev // 8, 0, 0])]
    ids += [CRITIQUE, t0 + 3, t0 + 4] if critique else []
    ids.append(TEXT_VOCAB.service_token("b"))
    batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
    batch = {k: v for k, v in batch.items() if k != "user_ids"}  # query_services: the asked service
    with torch.no_grad():
        q = model(**batch, logits_to_keep=1).hidden_states[0, -1, -width:]
    return model.item_table()[:, -width:] @ q


def test_cheaper_after_an_expensive_item_ranks_cheaper_items_first() -> None:
    """Bins 0..3 of service b's items; after an item of bin 3 and a critique, a weight on "below the
    previous item's bin" gives exactly the cheaper items the price term; after an item of bin 0
    none is cheaper; a request without a critique gets no price term."""
    bins = [0, 1, 2, 3, 3, 2, 1, 0]
    model = _price_model(5, bins, ["b"] * 8)
    with torch.no_grad():
        model.price_weight.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0]))

    def price_term(prev: int, critique: bool) -> torch.Tensor:
        return _ordinal_term(model, prev, critique, 4)

    cheaper = price_term(3, True)  # after item 3 (bin 3): items of bins 0..2 get 6
    assert cheaper.tolist() == pytest.approx([6.0, 6.0, 6.0, 0.0, 0.0, 6.0, 6.0, 6.0])
    order = torch.argsort(cheaper, descending=True, stable=True)[:6].tolist()
    assert all(bins[i] < 3 for i in order)
    assert price_term(0, True).tolist() == pytest.approx([0.0] * 8)  # nothing below bin 0
    assert price_term(3, False).abs().sum() == 0  # no critique: no price term


def test_price_bins_config_and_table_are_checked() -> None:
    with pytest.raises(ValueError, match="item_price_bins"):
        build_config(
            "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
            item_price_bins=4,
        )  # fmt: skip
    model = _price_model(6, [0, 1], ["b", "b"])
    with pytest.raises(ValueError, match="price bins"):
        model.set_item_price_bins(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="item_amounts needs item_words"):
        build_config(
            "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
            item_amounts=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="ordinal_word_votes needs item_price_bins or item_amounts"):
        _price_model(6, [0, 1], ["b", "b"], item_price_bins=0, ordinal_word_votes=True)
    model = _price_model(6, [0, 1], ["b", "b"], item_amounts=True)
    for bad, match in (([[0, 0]], "amount bins of shape"), ([[-2, 0], [0, 0]], "size bins"),
                       ([[0, 0], [0, 25]], "pack bins")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.set_item_amount_bins(torch.tensor(bad))


def test_critique_previous_weights_the_fields_shared_with_the_previous_item() -> None:
    """critique_previous: after an item of brand "sprint now" and category "gloss", a brand weight of
    -3 and a category weight of 1 give every item of that brand -3 and of that category 1 (whatever the
    critique says), nothing to the others, and nothing without a critique."""
    words = _phrase_words(
        [[[1, 2], [5], [9]], [[3, 2], [5], [9]], [[1, 2], [6, 5], [10]], [[1, 4], [7], [9]]]
    )
    model = _phrase_model(43, words, critique_previous=True)
    with torch.no_grad():
        model.previous_weight.bias.copy_(torch.tensor([-3.0, 1.0, 0.0]))
    u = model.phrases()[3].shape[1]
    t0 = TEXT_VOCAB.text_offset

    def term(critique: list[int]) -> list[float]:
        ids = [BOS, *TEXT_VOCAB.item_tokens("b", [0, 0, 0, 0]), CRITIQUE, *[t0 + w for w in critique]]
        ids.append(TEXT_VOCAB.service_token("b"))  # item 0: brand (1 2), category (5), band (9)
        batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
        batch = {k: v for k, v in batch.items() if k != "user_ids"}  # query_services: the asked service
        with torch.no_grad():
            q = model(**batch, logits_to_keep=1).hidden_states[0, -1, -u:]
        return (model.item_table()[:, -u:] @ q).tolist()

    assert term([8, 11]) == pytest.approx([-2.0, 1.0, -3.0, 0.0])
    assert term([]) == pytest.approx([0.0] * 4)
    with pytest.raises(ValueError, match="critique_previous"):
        build_config(
            "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
            critique_previous=True,
        )  # fmt: skip


def test_critique_named_previous_turns_the_previous_items_brand_away() -> None:
    """critique_named_previous: after an item of brand "sprint now", the critique "hop now, not
    sprint now" with a brand weight of 1 for any match and -3 more for a match the previous item
    holds gives the items of "hop now" 1 and those of "sprint now" 1 - 3, whichever comes first in
    the critique; nothing for the brand the critique does not name."""
    words = _phrase_words(
        [[[1, 2], [5], [9]], [[3, 2], [5], [9]], [[1, 2], [6, 5], [10]], [[1, 4], [7], [9]]]
    )  # item 0 (the previous one) and 2: "sprint now" (1 2); item 1: "hop now" (3 2); item 3: "sprint go"
    model = _phrase_model(45, words, critique_named_previous=True)
    with torch.no_grad():
        model.phrase_weight.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        model.named_previous_weight.bias.copy_(torch.tensor([-3.0, 0.0, 0.0]))
        model.phrase_weight.weight.zero_()  # the biases alone, no bilinear part
        model.phrase_q.weight.zero_()
    u = model.phrases()[3].shape[1]
    t0 = TEXT_VOCAB.text_offset

    def term(critique: list[int]) -> list[float]:
        ids = [BOS, *TEXT_VOCAB.item_tokens("b", [0, 0, 0, 0]), CRITIQUE, *[t0 + w for w in critique]]
        ids.append(TEXT_VOCAB.service_token("b"))
        batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
        batch = {k: v for k, v in batch.items() if k != "user_ids"}  # query_services: the asked service
        with torch.no_grad():
            q = model(**batch, logits_to_keep=1).hidden_states[0, -1, -u:]
        return (model.item_table()[:, -u:] @ q).tolist()

    assert term([3, 2, 11, 8, 1, 2]) == pytest.approx([-2.0, 1.0, -2.0, 0.0])
    assert term([1, 2, 8, 3, 2]) == pytest.approx([-2.0, 1.0, -2.0, 0.0])
    assert term([3, 2]) == pytest.approx([0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="critique_named_previous needs item_phrases"):
        build_config(
            "tiny", vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
            critique_named_previous=True,
        )  # fmt: skip


def test_critique_relative_scale_multiplies_the_price_and_previous_terms() -> None:
    """critique_relative_scale: the price and previous-item terms of the same weights, times it."""
    bins = [0, 1, 2, 3]
    words = _phrase_words(
        [[[1, 2], [5], [9]], [[3, 2], [5], [9]], [[1, 2], [6, 5], [10]], [[1, 4], [7], [9]]]
    )
    t0 = TEXT_VOCAB.text_offset
    ids = [BOS, *TEXT_VOCAB.item_tokens("b", [3, 0, 0, 0]), CRITIQUE, t0 + 3, t0 + 4]
    ids.append(TEXT_VOCAB.service_token("b"))
    batch = item_batch([{"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)}], TEXT_VOCAB, 32)
    tokens, asked = batch["item_tokens"], batch["query_services"]
    terms = []
    for scale in (1.0, 3.0):
        model = _phrase_model(
            44, words, critique_previous=True, item_price_bins=4, critique_relative_scale=scale
        )
        model.set_item_price_bins(torch.tensor(bins))
        hidden = torch.randn(
            *tokens.shape[:2], model.config.hidden_size, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            for layer in (model.previous_weight, model.price_weight):
                layer.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
                layer.bias.fill_(0.5)
            terms.append(
                (
                    model.critique_ordinals(tokens, hidden, asked),
                    model.critique_previous(tokens, hidden, asked),
                )
            )
    for one, three in zip(*terms, strict=True):
        assert float(one.abs().sum()) > 0
        torch.testing.assert_close(three, 3 * one)


def test_query_scores_skip_only_the_zero_critique_parts() -> None:
    """query_scores: the same scores and gradients as ``query @ vectors.T`` when some rows read no
    critique (their parts past plain_query_width are zero) and others do; those zero parts get no
    gradient (in the model they are products with a zero mask, so nothing upstream would)."""
    words = _phrase_words([[[1, 2], [5], [9]], [[3, 2], [5], [9]], [[1, 4], [7], [10]]])
    model = _phrase_model(45, words, item_price_bins=4)
    width = model.item_table().shape[1]
    plain = model.plain_query_width()
    assert plain == model.config.hidden_size < width
    g = torch.Generator().manual_seed(0)
    query = torch.randn(6, width, generator=g)
    query[[0, 2, 3], plain:] = 0.0  # positions without a critique
    vectors = torch.randn(5, width, generator=g)
    grads = []
    for scores_of in (model.query_scores, lambda q, v: q @ v.T):
        q, v = query.clone().requires_grad_(), vectors.clone().requires_grad_()
        scores = scores_of(q, v)
        (scores * torch.arange(scores.numel()).view_as(scores)).sum().backward()
        grads.append((scores.detach(), q.grad, v.grad))
    (fast_scores, fast_q, fast_v), (scores, q_grad, v_grad) = grads
    torch.testing.assert_close(fast_scores, scores)
    torch.testing.assert_close(fast_v, v_grad)
    assert not fast_q[[0, 2, 3], plain:].any()
    q_grad[[0, 2, 3], plain:] = 0.0
    torch.testing.assert_close(fast_q, q_grad)


def _decoder_outputs(model: MoERecForItemPrediction, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, D) the decoder's outputs for an item batch (what the heads read)."""
    hidden, _, _ = model.model(
        None, batch["domain_ids"], user_ids=batch["user_ids"], attention_mask=batch["attention_mask"],
        inputs_embeds=model.embed_positions(batch["item_tokens"]),
    )  # fmt: skip
    return hidden


def _gradient_by_service(model: MoERecForItemPrediction, per_service: torch.nn.Parameter) -> torch.Tensor:
    """(num_domains,) how much one training step on a sample of services "a" then "c" moves each
    service slot's part of ``per_service`` ((num_domains, ...))."""
    one = item_batch([_sample([("a", [1, 2, 3, 0]), ("c", [4, 5, 6, 1])], "u")], VOCAB, 16)
    model.train()(**one).loss.backward()
    return per_service.grad.flatten(1).abs().sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_service_heads_match_a_plain_loop_over_positions(seed: int) -> None:
    """service_heads: each position's code logits are the cosine of ``(W_p + Delta_p^s) q`` with the
    code rows / T, s its asked service, against a float64 loop; training moves only the asked
    services' Delta."""
    model = _model(seed, service_heads=True)
    assert not model.service_proj.any()  # every service starts from the shared heads
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.service_proj.normal_(0.0, 0.05, generator=g)
    rows = [_sample(_random_events(g, n), f"u{n}", ask=ask) for n, ask in ((2, "a"), (5, "c"), (0, "b"))]
    batch = item_batch(rows, VOCAB, 16, left_pad=True)
    hidden = _decoder_outputs(model, batch)
    asked = batch["query_services"]  # (B, T): each row's asked service at every position
    logits = model.code_logits(hidden, asked)  # (B, T, P, K)
    d, p_len = model.config.hidden_size, model.num_codes
    code_rows, valid = model.code_layout(hidden.device)
    codes = model.model.embed_tokens.weight.double()[code_rows]  # (P, K, D)
    w = model.code_proj.weight.double().view(p_len, d, d)
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            if not batch["attention_mask"][b, t]:
                continue
            s = int(asked[b, t]) - VOCAB.service_offset  # the service's slot
            q = hidden[b, t].double() + model.model.embed_tokens.weight[asked[b, t]].double()
            delta = model.service_proj[s].double().view(p_len, d, d)
            for p in range(p_len):
                proj = (w[p] + delta[p]) @ q
                want = torch.nn.functional.cosine_similarity(proj[None], codes[p], dim=-1)
                want = want / model.config.item_head_temperature
                got = logits[b, t, p].double()
                torch.testing.assert_close(got[valid[p]], want[valid[p]], atol=1e-4, rtol=1e-4)
    # only the services asked get a gradient: no position asks for "b" after its first event here
    grad = _gradient_by_service(model, model.service_proj)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0
    with pytest.raises(ValueError, match="service_heads needs the item-level model"):
        build_config("tiny", service_heads=True)


def test_pad_adds_nothing_to_a_position_and_gets_no_gradient() -> None:
    """A position is the mean of its real tokens' rows x sqrt(D) ([BOS] alone: its own row), and
    training never moves [PAD]'s row (zero from the start)."""
    model = _model(int(torch.randint(1000, (1,))))
    batch = item_batch([_sample([("a", [1, 2, 3, 0]), ("c", [4, 5, 6, 1])], "u")], VOCAB, 16)
    x = model.embed_positions(batch["item_tokens"])
    torch.testing.assert_close(
        x[0, 0], model.model.embed_tokens.weight[BOS] * math.sqrt(model.config.hidden_size)
    )
    model.train()(**batch).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert not grad[PAD].any() and grad[BOS].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_service_codes_match_a_plain_loop_over_tokens_and_positions(seed: int) -> None:
    """service_codes: an event's input is the mean of its tokens' rows with its codes' rows taken as
    ``E + E^s`` (s its service), and each position's code logits are the cosine with the asked
    service's ``E + E^s`` rows, against float64 loops; training moves only the services in the batch."""
    model = _model(seed, service_codes=True)
    assert not model.service_code_embed.any()  # every service starts from the shared code rows
    g = torch.Generator().manual_seed(200 + seed)
    with torch.no_grad():
        model.service_code_embed.normal_(0.0, 0.05, generator=g)
    rows = [_sample(_random_events(g, n), f"u{n}", ask=ask) for n, ask in ((2, "a"), (5, "c"), (0, "b"))]
    batch = item_batch(rows, VOCAB, 16, left_pad=True)
    tokens = batch["item_tokens"]
    table = model.model.embed_tokens.weight.double()
    first_code = VOCAB.code_offset
    x = model.embed_positions(tokens).double()
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            ids = [int(i) for i in tokens[b, t] if i != PAD]
            if not ids:
                continue
            s = ids[0] - VOCAB.service_offset  # an event's service slot (BOS: none, no codes follow)
            vec = sum(table[i] + (model.service_code_embed[s, i - first_code].double() if i >= first_code else 0)
                      for i in ids)  # fmt: skip
            torch.testing.assert_close(x[b, t], vec / len(ids) * math.sqrt(model.config.hidden_size))
    hidden = _decoder_outputs(model, batch)
    asked = batch["query_services"]
    logits = model.code_logits(hidden, asked)  # (B, T, P, K)
    d, p_len = model.config.hidden_size, model.num_codes
    code_rows, valid = model.code_layout(hidden.device)
    w = model.code_proj.weight.double().view(p_len, d, d)
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            if not batch["attention_mask"][b, t]:
                continue
            s = int(asked[b, t]) - VOCAB.service_offset
            q = hidden[b, t].double() + table[asked[b, t]]
            for p in range(p_len):
                ids = code_rows[p][valid[p]]
                codes = table[ids] + model.service_code_embed[s, ids - first_code].double()
                want = torch.nn.functional.cosine_similarity((w[p] @ q)[None], codes, dim=-1)
                want = want / model.config.item_head_temperature
                torch.testing.assert_close(logits[b, t, p][valid[p]].double(), want, atol=1e-4, rtol=1e-4)
    # only the services in the batch get a gradient: "b" is neither an event nor asked here
    grad = _gradient_by_service(model, model.service_code_embed)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0
    with pytest.raises(ValueError, match="service_codes needs the item-level model"):
        build_config("tiny", service_codes=True)
    with pytest.raises(ValueError, match="service_text needs item_text"):
        build_config("tiny", code_token_ranges=code_token_ranges(VOCAB), item_loss="items", item_embedding=True,
                     num_items=4, service_text=True)  # fmt: skip


def test_text_prior_by_service_needs_the_prior_and_keeps_one_weight_per_service() -> None:
    """item_text_prior_by_service: one weight per service slot, each starting where the shared one
    does; without item_text_prior the config names what is missing."""
    shared = _model(0, item_loss="items", item_embedding=True, num_items=4, item_text=True,
                    item_text_dim=6, item_text_prior=True)  # fmt: skip
    own = _model(0, item_loss="items", item_embedding=True, num_items=4, item_text=True,
                 item_text_dim=6, item_text_prior=True, item_text_prior_by_service=True)  # fmt: skip
    assert own.text_prior.shape == (3,) and shared.text_prior.shape == (1,)
    torch.testing.assert_close(own.text_prior, shared.text_prior.expand(3))
    with pytest.raises(ValueError, match="item_text_prior_by_service needs item_text_prior"):
        _model(0, item_loss="items", item_embedding=True, num_items=4, item_text=True, item_text_dim=6,
               item_text_prior_by_service=True)  # fmt: skip


@pytest.mark.parametrize(
    ("seed", "m", "n", "p", "k"), [(0, 7, 50, 4, 3), (1, 64, 300, 16, 8), (2, 1, 9, 1, 2)]
)
def test_same_codes_equals_the_full_comparison(seed: int, m: int, n: int, p: int, k: int) -> None:
    """same_codes (first code, then the rest of the matching pairs) against the (M, N, P) comparison
    on random IDs from a small alphabet, so many pairs share a first code and some whole IDs, with
    copies of catalogue rows among the targets."""
    from moe_rec.model.item_model import same_codes

    g = torch.Generator().manual_seed(1000 + seed)
    codes = torch.randint(k, (n, p), generator=g)
    targets = torch.randint(k, (m, p), generator=g)
    targets[: m // 2] = codes[torch.randint(n, (m // 2,), generator=g)]  # some targets are catalogue items
    want = (targets[:, None] == codes[None]).all(-1)
    got = same_codes(targets, codes)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert bool(want[: m // 2].any(-1).all())  # the copied targets were found


@pytest.mark.parametrize(("p", "k", "m", "n"), [(1, 2, 1, 1), (4, 8, 5, 30), (17, 256, 40, 300)])
def test_gather_scores_backward_equals_autograd_of_the_plain_loop(p: int, k: int, m: int, n: int) -> None:
    """gather_scores' own backward (one zero tensor, index-added per code position) against autograd
    through gather_scores_reference, float64, fresh random inputs with repeated codes."""
    from moe_rec.model.item_model import gather_scores, gather_scores_reference

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    codes = torch.randint(k, (n, p), generator=g)
    upstream = torch.randn(n, m, generator=g, dtype=torch.float64)
    by_code = torch.randn(p, k, m, generator=g, dtype=torch.float64, requires_grad=True)
    fast = gather_scores(by_code, codes)
    (grad_fast,) = torch.autograd.grad((fast * upstream).sum(), by_code)
    plain = gather_scores_reference(by_code, codes)
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), by_code)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-12, atol=1e-12)
    assert grad_fast.abs().sum() > 0


@pytest.mark.parametrize("service_codes", [False, True])
def test_training_loss_and_gradients_equal_a_plain_loop_over_the_logits(service_codes: bool) -> None:
    """In training the item loss reads only the scored positions' code scores, never the (B, T, P,
    K) logits (``out.logits`` is None); its loss and every parameter's gradient equal those of a
    plain loop over positions and catalogue items on the logits that evaluation makes (float64,
    the tiny config has no dropout), with and without each service's own code rows."""
    fields = {"service_codes": True} if service_codes else {}
    model = _model(21, item_loss="items", **fields)
    if service_codes:
        with torch.no_grad():
            model.service_code_embed.normal_(0, 0.3)  # zero-initialised: give each service its own rows
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    catalogue = _catalogue(g)
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    picks = [torch.randint(len(catalogue), (n,), generator=g).tolist() for n in (4, 2, 3)]
    rows = [_sample([catalogue[i] for i in pick], f"u{j}") for j, pick in enumerate(picks)]
    batch = item_batch(rows, VOCAB, 16)

    model.train()
    out = model(**batch)
    assert out.logits is None
    params = [q for q in model.parameters() if q.requires_grad]
    fast = torch.autograd.grad(out.lm_loss, params, allow_unused=True)

    model.eval()
    z = model(**batch).logits.double()  # (B, T, P, K), -inf past a short code range
    losses = []
    for b in range(z.shape[0]):
        tokens, labels = batch["item_tokens"][b], batch["labels"][b]
        for t in range(tokens.shape[0] - 1):
            if labels[t + 1, 0] == IGNORE_INDEX:
                continue
            service = int(tokens[t + 1, 0])
            items = [c for s, c in catalogue if VOCAB.service_token(s) == service]
            scores = torch.stack(
                [sum(z[b, t, p, c] for p, c in enumerate(codes)) / len(codes) for codes in items]
            )
            target = sum(z[b, t, p, c] for p, c in enumerate(labels[t + 1].tolist())) / z.shape[2]
            losses.append(torch.logsumexp(scores, 0) - target)
    want = torch.stack(losses).mean()
    plain = torch.autograd.grad(want, params, allow_unused=True)
    assert out.lm_loss.item() == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(fast, plain, strict=True):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert sum(1 for a in fast if a is not None and a.abs().sum() > 0) > 5


def test_a_saved_config_without_the_same_service_prior_reads_its_own_item(tmp_path) -> None:
    """A config saved before ``item_text_prior_same_service`` existed loads with it off (the model
    scores as it was trained); one saved with it, or a new one, keeps the value."""
    from moe_rec.model.config import MoERecConfig

    model = _model(5, item_loss="items", item_embedding=True, num_items=12, item_text=True,
                   item_text_dim=6, item_text_prior=True)  # fmt: skip
    assert model.config.item_text_prior_same_service  # the default
    model.config.save_pretrained(tmp_path / "new")
    assert MoERecConfig.from_pretrained(tmp_path / "new").item_text_prior_same_service
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    del saved["item_text_prior_same_service"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    assert not MoERecConfig.from_json_file(tmp_path / "old.json").item_text_prior_same_service
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert not MoERecConfig.from_pretrained(tmp_path / "old").item_text_prior_same_service


def test_negatives_drawn_from_a_seed_are_the_same_in_every_forward_until_it_changes() -> None:
    """draw_negatives_from(seed): every forward scores the same sampled items of each service (the
    same training loss twice; a step's micro batches share one draw); another seed draws others;
    None draws afresh each forward."""
    g = torch.Generator().manual_seed(18)
    catalogue = _catalogue(g)
    model = _model(19, "token", item_loss="items", item_negatives=2).train()
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    rows = model._service_rows(VOCAB.service_token("b"))  # 4 items: 2 draws give 1 or 2 of them

    def draws(n: int) -> set[tuple[int, ...]]:
        return {tuple(model._draw_negatives(rows, VOCAB.service_token("b")).tolist()) for _ in range(n)}

    model.draw_negatives_from(7)
    first = draws(20)
    assert len(first) == 1
    others: set[tuple[int, ...]] = set()
    for seed in range(8, 40):
        model.draw_negatives_from(seed)
        others |= draws(1)
    assert others - first  # other seeds draw other items
    model.draw_negatives_from(None)
    assert len(draws(40)) > 1
    batch = item_batch([_sample([catalogue[i] for i in (0, 5, 9, 3)], "u")], VOCAB, 16)
    batch.pop("user_ids")
    model.eval()  # no dropout: the loss differs only by the drawn items
    model.draw_negatives_from(3)
    assert model(**batch).lm_loss.item() == model(**batch).lm_loss.item()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 7, 33])
def test_copy_logits_match_the_plain_loop(seed: int, m: int) -> None:
    """narrative_copy: copy_logits (sorted, de-duplicated, one scatter) equals the plain loop on random
    item words with repeats and [PAD], random gates, and rows of -1 (no explained item: zero)."""
    from moe_rec.model.item_model import reference_copy_logits

    g = torch.Generator().manual_seed(100 + seed)
    model, catalogue, _ = _words_model(seed, narrative_copy=True)
    start, stop = model.config.text_token_range
    words = start + torch.randint(4, (len(catalogue), 4, model.config.item_word_slots), generator=g)
    words[torch.rand(words.shape, generator=g) < 0.3] = PAD  # few distinct ids: repeats in every field
    model.set_item_words(words)
    with torch.no_grad():
        model.copy_weight.weight.normal_(0, 1.0, generator=g)
        model.copy_weight.bias.normal_(0, 1.0, generator=g)
    hidden = torch.randn(m, model.config.hidden_size, generator=g)
    rows = torch.randint(-1, len(catalogue), (m,), generator=g)
    gates = model.copy_weight(hidden).detach()
    expected = reference_copy_logits(words[rows.clamp_min(0)], gates, start, stop)
    expected[rows < 0] = 0.0
    torch.testing.assert_close(
        model.copy_logits(hidden, rows).detach().double(), expected, rtol=1e-6, atol=1e-6
    )


def test_text_loss_with_copy_adds_the_explained_items_words_by_hand() -> None:
    """narrative_copy: each narrative position's logits are the tied head's plus c_f(h_t) on the words
    of the item it explains (the last item at or before t: the target after the critique), checked
    against a float64 loop; the gradient reaches the copy gates."""
    from moe_rec.model.item_model import reference_copy_logits

    model, _, words = _words_model(41, narrative_copy=True)
    with torch.no_grad():
        model.copy_weight.weight.normal_(0, 0.5)
        model.copy_weight.bias.normal_(0, 0.5)
    start, stop = model.config.text_token_range
    batch = item_batch([_text_sample()], TEXT_VOCAB, 16)
    batch.pop("user_ids")
    assert model.explained_rows(batch["item_tokens"])[0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    captured = {}
    model.model.register_forward_hook(lambda mod, args, out: captured.update(hidden=out[0]))
    out = model(**batch)
    h = captured["hidden"][0].detach().double()
    emb = model.model.embed_tokens.weight.detach().double()
    head = torch.cat([emb[start:stop], emb[EOS : EOS + 1]])
    w, b = model.copy_weight.weight.detach().double(), model.copy_weight.bias.detach().double()
    nll = []
    for t, cls in ((6, 11), (7, 19), (8, 20)):
        logits = head @ h[t] + reference_copy_logits(words[1:2], (w @ h[t] + b)[None], start, stop)[0]
        nll.append(float(torch.logsumexp(logits, 0) - logits[cls]))
    assert out.text_loss.item() == pytest.approx(sum(nll) / 3, rel=1e-4)
    out.text_loss.backward()
    assert model.copy_weight.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(3))
def test_history_copy_matches_the_plain_loop(seed: int) -> None:
    """narrative_history_copy: history_shares + history_copy_logits at random positions of random
    sequences (events of three services, critiques, narratives, items outside the catalogue, left
    padding) equal the plain loop: each position's history found by walking back from it (the
    explained item: the last catalogue item at or before it; its history: the earlier catalogue
    items of its service)."""
    from moe_rec.model.item_model import reference_history_copy

    g = torch.Generator().manual_seed(200 + seed)
    model, catalogue, words = _words_model(seed, narrative_copy=True, narrative_history_copy=True)
    start, stop = model.config.text_token_range
    with torch.no_grad():
        model.history_copy_weight.weight.normal_(0, 1.0, generator=g)
        model.history_copy_weight.bias.normal_(0, 1.0, generator=g)
    t0, rows = TEXT_VOCAB.text_offset, []
    for _ in range(3):
        ids = [BOS]
        for _ in range(int(torch.randint(2, 9, (1,), generator=g))):
            i = int(torch.randint(len(catalogue) + 1, (1,), generator=g))  # len(catalogue): no catalogue item
            service, codes = catalogue[i] if i < len(catalogue) else ("a", [6, 6, 6, 3])
            ids += TEXT_VOCAB.item_tokens(service, codes)
            if bool(torch.rand(1, generator=g) < 0.4):
                ids += [EXPLAIN if bool(torch.rand(1, generator=g) < 0.5) else CRITIQUE, t0 + 2, t0 + 5]
        ids.append(TEXT_VOCAB.service_token("b"))
        rows.append({"user": "u", "input_ids": ids, "domain_ids": [1] * len(ids)})
    tokens = item_batch(rows, TEXT_VOCAB, 64, left_pad=True)["item_tokens"]
    b = torch.randint(tokens.shape[0], (40,), generator=g)
    t = torch.randint(tokens.shape[1], (40,), generator=g)
    hidden = torch.randn(40, model.config.hidden_size, generator=g)
    got = model.history_copy_logits(hidden, *model.history_shares(tokens, b, t)).detach().double()
    keys = {tuple(TEXT_VOCAB.item_tokens(s, c)): n for n, (s, c) in enumerate(catalogue)}
    history, nonempty = [], 0
    for bi, ti in zip(b.tolist(), t.tolist(), strict=True):
        row_at = [keys.get(tuple(x), -1) for x in tokens[bi].tolist()]  # each position's catalogue row
        at = next((p for p in range(ti, -1, -1) if row_at[p] >= 0), None)
        held = [] if at is None else [
            row_at[p] for p in range(at) if row_at[p] >= 0 and tokens[bi, p, 0] == tokens[bi, at, 0]
        ]  # fmt: skip
        nonempty += bool(held)
        history.append(words[held])
    expected = reference_history_copy(history, model.history_copy_weight(hidden).detach(), start, stop)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert nonempty >= 5


def test_text_loss_with_history_copy_reaches_its_gates() -> None:
    """narrative_history_copy in training: the narrative's text loss changes with the history gates
    and its gradient reaches them; refused by name without narrative_copy."""
    model, _, _ = _words_model(42, narrative_copy=True, narrative_history_copy=True)
    row = _text_sample()
    first = TEXT_VOCAB.item_tokens("b", [7, 7, 7, 0])  # a history of two items of b before the target
    row = {**row, "input_ids": [row["input_ids"][0], *first, *row["input_ids"][1:]]}
    row["domain_ids"] = [1] * len(row["input_ids"])
    batch = item_batch([row], TEXT_VOCAB, 16)
    batch.pop("user_ids")
    before = model(**batch).text_loss.item()
    with torch.no_grad():
        model.history_copy_weight.bias.fill_(3.0)
    out = model(**batch)
    assert out.text_loss.item() != pytest.approx(before, rel=1e-4)
    out.text_loss.backward()
    assert model.history_copy_weight.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="narrative_history_copy needs narrative_copy"):
        _words_model(42, narrative_history_copy=True)


def test_narrative_copy_needs_the_item_words_table_and_a_text_head() -> None:
    """narrative_copy alone holds the item words (no critique term), and is refused by name without
    the text range or the table's width."""
    start, stop = TEXT_VOCAB.text_offset, TEXT_VOCAB.size
    base = dict(vocab_size=TEXT_VOCAB.size, num_domains=3, code_token_ranges=code_token_ranges(TEXT_VOCAB),
                item_loss="items", item_embedding=True, num_items=4, narrative_copy=True)  # fmt: skip
    model = MoERecForItemPrediction(
        build_config("tiny", text_token_range=[start, stop], item_word_slots=2, **base)
    )
    assert model.item_words.shape == (4, 4, 2) and model.word_weight is None and model.copy_weight is not None
    for missing in (dict(item_word_slots=2), dict(text_token_range=[start, stop])):
        with pytest.raises(ValueError, match="narrative_copy needs item_embedding, text_token_range"):
            build_config("tiny", **missing, **base)
