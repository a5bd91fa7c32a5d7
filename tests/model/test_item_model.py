"""The item-level model: token samples regrouped into positions, the loss against a float64
per-code cross-entropy computed by hand, padding invariance, and the service-conditioned heads."""

from __future__ import annotations

import math

import pytest
import torch

from moe_rec.data.positions import code_token_ranges, item_batch, split_positions
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import BOS, PAD, Vocabulary
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
    tokens, domains, asked = split_positions(row["input_ids"], row["domain_ids"], VOCAB)
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


def test_item_softmax_loss_is_the_cross_entropy_over_the_target_services_items() -> None:
    """item_loss='items': a float64 loop over every scored position and every item of its service."""
    model = _model(8, "token", item_loss="items")
    g = torch.Generator().manual_seed(9)
    catalogue = _catalogue(g)
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    rows = [
        _sample([catalogue[i] for i in picks], f"u{j}") for j, picks in enumerate([[0, 5, 9], [11, 2], [7]])
    ]
    batch = item_batch(rows, VOCAB, 16)
    batch.pop("user_ids")
    out = model(**batch)
    total, count = 0.0, 0
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
            total += math.log(sum(math.exp(x) for x in logits)) - target
            count += 1
    assert count == 6
    assert out.lm_loss.item() == pytest.approx(total / count, rel=1e-5)  # fp32 against float64 sums
    with pytest.raises(ValueError, match="set_train_catalogue"):
        MoERecForItemPrediction(model.config)(**batch)


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


@pytest.mark.parametrize(("text", "prior"), [(False, False), (True, False), (True, True)],
                         ids=["vector", "vector+text", "vector+text+prior"])  # fmt: skip
def test_item_embedding_keys_rows_and_loss(text: bool, prior: bool) -> None:
    """item_embedding: each catalogue item found by its (service, codes) key, a cold item and [BOS]
    by none; the loss adds ``query . vector`` to the mean code logit (a float64 loop again); with
    item_text the vector is the learned one plus the projected text embedding; with
    item_text_prior also ``w x cos`` of the position's own item's text and the candidate's, 0 for
    the own item itself."""
    g = torch.Generator().manual_seed(11)
    catalogue = _catalogue(g)
    model = _model(
        12, "token", item_loss="items", item_embedding=True, num_items=len(catalogue),
        item_text=text, item_text_dim=6 if text else 0, item_text_prior=prior,
    )  # fmt: skip
    assert model.item_embed.weight.abs().sum() == 0  # no item term before training
    if text:
        model.set_item_text(torch.randn(len(catalogue), 6, generator=g))
    model.set_train_catalogue(
        torch.tensor([c for _, c in catalogue]), torch.tensor([VOCAB.service_token(s) for s, _ in catalogue])
    )
    with torch.no_grad():
        model.item_embed.weight.normal_(0, 0.5)
    # the cold item is of catalogue[2]'s service, so position 1 (own item catalogue[2]) ranks its own item
    cold = ("a", [7, 7, 7, 3]) if ("a", [7, 7, 7, 3]) not in catalogue else ("a", [6, 6, 6, 3])
    row = _sample([catalogue[2], cold, catalogue[9]], "u")
    one = item_batch([row], VOCAB, 16)
    one.pop("user_ids")
    assert model.position_rows(one["item_tokens"])[0].tolist() == [-1, 2, -1, 9]
    out = model(**one)
    z = out.logits[0].detach().double()
    d = model.config.hidden_size
    q = out.hidden_states[0, :, :d].detach().double()  # the heads' query; with the prior, text follows
    vec = model.item_embed.weight.detach().double()
    if text:
        vec = vec + model.item_text.double() @ model.text_proj.weight.detach().double().T
    torch.testing.assert_close(model.item_table()[:, :d].double(), vec)
    own = [-1, 2, -1, 9]  # each position's own catalogue row ([BOS], catalogue[2], cold, catalogue[9])

    def text_prior(t: int, row: int | None) -> float:
        if not prior or own[t] < 0 or row is None or row == own[t]:
            return 0.0
        a, b = model.item_text[own[t]].double(), model.item_text[row].double()
        return float(model.text_prior) * float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for t, nxt in ((0, catalogue[2]), (1, cold), (2, catalogue[9])):
        service = VOCAB.service_token(nxt[0])

        others = [
            _logit(z[t], q[t], vec, i, c) + text_prior(t, i)
            for i, (s, c) in enumerate(catalogue)
            if VOCAB.service_token(s) == service
        ]
        row = catalogue.index(nxt) if nxt in catalogue else None
        target = _logit(z[t], q[t], vec, row, nxt[1]) + text_prior(t, row)
        # a cold target has no vector and is not in the normaliser (training targets always are)
        total += math.log(sum(math.exp(x) for x in others)) - target
    assert out.lm_loss.item() == pytest.approx(total / 3, rel=1e-5)  # fp32 against float64 sums


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
