"""Constrained beam search against a brute-force reference that teacher-forces every valid item.

With a beam at least as wide as the catalogue, beam search must return exactly the brute-force
ranking (items, and scores within 1e-5); with a narrower beam every returned ID must be valid,
scores sorted and equal to the teacher-forced score of that item. Also: batches mixing services,
left padding against one-by-one decoding, exclusion of seen items, determinism, and every router
mode (``domain_user`` reorders the profile state in the cache with the beams).
"""

import pytest
import torch

from moe_rec.data.vocab import BOS, Vocabulary
from moe_rec.eval.beam_search import constrained_beam_search
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import SIDTrie

SERVICES = ("grocery", "market", "food")
LEVELS, K, DEDUP, USERS = 2, 5, 3, 7
ITEMS_PER_SERVICE = {"grocery": 14, "market": 9, "food": 11}


def _table(seed: int = 0) -> SIDTable:
    """Random distinct full IDs per service; a few share (c1, c2) so the dedup code matters."""
    g = torch.Generator().manual_seed(seed)
    services, item_ids, codes = [], [], []
    for s, n in ITEMS_PER_SERVICE.items():
        ids = torch.randperm(K**LEVELS * DEDUP, generator=g)[:n]  # distinct packed (c1, c2, dedup)
        codes.append(torch.stack([ids // (K * DEDUP), ids // DEDUP % K, ids % DEDUP], 1))
        services += [s] * n
        item_ids += [f"{s}-{i}" for i in range(n)]
    return SIDTable(
        services=services, item_ids=item_ids, codes=torch.cat(codes), codebook_size=K, max_dedup=DEDUP
    )


def _model(vocab: Vocabulary, mode: str = "domain_user", seed: int = 0) -> MoERecForCausalLM:
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny",
        vocab_size=vocab.size,
        num_domains=len(vocab.services),
        num_user_buckets=USERS,
        router_mode=mode,
    )
    model = MoERecForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so scores spread out and ties are unlikely
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "domain_bias" in name:
                p.normal_(0, 0.3)
        model.model.embed_tokens.weight.mul_(4.0)
    return model


def _prompt(table: SIDTable, vocab: Vocabulary, service: str, events: int, seed: int) -> tuple[list, list]:
    """``[BOS]`` + ``events`` random items of random services + the requested service's token."""
    g = torch.Generator().manual_seed(seed)
    ids, domains = [BOS], []
    for row in torch.randint(0, len(table), (events,), generator=g).tolist():
        s = table.services[int(table.service_index[row])]
        tokens = vocab.item_tokens(s, table.codes[row].tolist())
        ids += tokens
        domains += [vocab.service_index(s)] * len(tokens)
    ids.append(vocab.service_token(service))
    domains.append(vocab.service_index(service))
    return ids, [domains[0], *domains]


def _batch(prompts: list[tuple[list, list]]) -> dict[str, torch.Tensor]:
    """Left-pad prompts into input_ids / attention_mask / domain_ids (B, T)."""
    t = max(len(ids) for ids, _ in prompts)
    pad = [t - len(ids) for ids, _ in prompts]
    return {
        "input_ids": torch.tensor([[0] * p + ids for p, (ids, _) in zip(pad, prompts)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(ids) for p, (ids, _) in zip(pad, prompts)]),
        "domain_ids": torch.tensor([[0] * p + dom for p, (_, dom) in zip(pad, prompts)]),
    }


@torch.no_grad()
def teacher_forced_scores(
    model: MoERecForCausalLM,
    vocab: Vocabulary,
    prompt: tuple[list, list],
    user: int,
    service: str,
    codes: torch.Tensor,
) -> torch.Tensor:
    """Sum of log-probs (N,) of each full ID in ``codes`` (N, L+1) after one unpadded prompt."""
    ids, domains = prompt
    items = torch.tensor([vocab.item_tokens(service, c)[1:] for c in codes.tolist()])  # (N, L+1)
    n, t = len(items), len(ids)
    seq = torch.cat([torch.tensor(ids).expand(n, t), items], 1)  # (N, T+L+1)
    dom = torch.tensor(domains + [vocab.service_index(service)] * items.shape[1]).expand(n, -1)
    logp = torch.log_softmax(model(seq, dom, torch.full((n,), user)).logits.float(), -1)  # (N, T+L+1, V)
    return logp[:, t - 1 : -1].gather(2, items[..., None]).squeeze(2).sum(1)


def brute_force(
    model: MoERecForCausalLM,
    table: SIDTable,
    vocab: Vocabulary,
    prompt: tuple[list, list],
    user: int,
    service: str,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``service`` ranked by its teacher-forced score: codes (N, L+1), scores (N,)."""
    codes = table.codes[table.service_index == table.services.index(service)]
    if exclude is not None:
        keep = ~(codes[:, None] == exclude[None]).all(-1).any(1)
        codes = codes[keep]
    scores = teacher_forced_scores(model, vocab, prompt, user, service, codes)
    order = torch.sort(scores, descending=True, stable=True).indices
    return codes[order], scores[order]


def _search(
    model: MoERecForCausalLM,
    trie: SIDTrie,
    vocab: Vocabulary,
    prompts: list[tuple[list, list]],
    users: list[int],
    services: list[str],
    w: int,
    exclude: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over left-padded ``prompts``: codes (B, W, L+1), scores (B, W)."""
    return constrained_beam_search(
        model, trie, vocab, **_batch(prompts), user_ids=torch.tensor(users), services=services,
        beam_width=w, exclude_codes=exclude,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> tuple[SIDTable, SIDTrie, Vocabulary]:
    table = _table()
    return table, table.trie(), table.vocabulary()


@pytest.mark.parametrize("mode", ["token", "domain", "domain_user"])
def test_wide_beam_equals_brute_force_in_a_mixed_padded_batch(setup, mode: str) -> None:
    table, trie, vocab = setup
    model = _model(vocab, mode)
    services = ["grocery", "food", "market", "grocery"]
    prompts = [
        _prompt(table, vocab, s, events=e, seed=i) for i, (s, e) in enumerate(zip(services, [3, 1, 4, 0]))
    ]
    users = [1, 4, 6, 2]
    w = max(ITEMS_PER_SERVICE.values()) + 2
    codes, scores = _search(model, trie, vocab, prompts, users, services, w)
    assert codes.shape == (4, w, LEVELS + 1) and scores.shape == (4, w)
    for b, s in enumerate(services):
        ref_codes, ref_scores = brute_force(model, table, vocab, prompts[b], users[b], s)
        n = len(ref_codes)
        assert torch.equal(codes[b, :n], ref_codes)
        # scores sum L+1 fp32 log-probabilities, of order 20: one rounding there is ~2e-6 (measured 1.9e-6)
        torch.testing.assert_close(scores[b, :n], ref_scores, rtol=0, atol=1e-5)
        assert (codes[b, n:] == -1).all() and torch.isneginf(scores[b, n:]).all()


def test_narrow_beam_returns_valid_sorted_items_with_their_scores(setup) -> None:
    table, trie, vocab = setup
    model = _model(vocab)
    services = ["market", "grocery", "food"]
    prompts = [_prompt(table, vocab, s, events=3, seed=10 + i) for i, s in enumerate(services)]
    users = [0, 3, 5]
    codes, scores = _search(model, trie, vocab, prompts, users, services, 4)
    for b, s in enumerate(services):
        assert trie.contains(s, codes[b]).all()
        assert len({tuple(c) for c in codes[b].tolist()}) == 4  # distinct items
        assert (scores[b, :-1] >= scores[b, 1:]).all()
        ref = teacher_forced_scores(model, vocab, prompts[b], users[b], s, codes[b])
        torch.testing.assert_close(scores[b], ref, rtol=0, atol=1e-5)  # fp32 sums of order 20, as above


def test_left_padding_matches_one_by_one_and_is_deterministic(setup) -> None:
    table, trie, vocab = setup
    model = _model(vocab)
    services = ["food", "grocery", "market"]
    prompts = [
        _prompt(table, vocab, s, events=e, seed=20 + i) for i, (s, e) in enumerate(zip(services, [5, 0, 2]))
    ]
    users = [2, 2, 6]
    codes, scores = _search(model, trie, vocab, prompts, users, services, 6)
    again_codes, again_scores = _search(model, trie, vocab, prompts, users, services, 6)
    assert torch.equal(codes, again_codes) and torch.equal(scores, again_scores)
    for b in range(3):
        one_codes, one_scores = _search(
            model, trie, vocab, prompts[b : b + 1], users[b : b + 1], services[b : b + 1], 6
        )
        assert torch.equal(codes[b], one_codes[0])
        torch.testing.assert_close(scores[b], one_scores[0], rtol=0, atol=1e-5)  # padding reorders fp32 sums


def test_exclusion_removes_seen_items(setup) -> None:
    table, trie, vocab = setup
    model = _model(vocab)
    services = ["grocery", "market"]
    prompts = [_prompt(table, vocab, s, events=2, seed=30 + i) for i, s in enumerate(services)]
    users = [1, 5]
    full, _ = _search(model, trie, vocab, prompts, users, services, 20)
    exclude = [
        full[0, [0, 2]],
        torch.tensor([[K + 1, 0, 0]]),
    ]  # top-1 and top-3; an out-of-range ID is ignored
    codes, scores = _search(model, trie, vocab, prompts, users, services, 20, exclude)
    ref_codes, ref_scores = brute_force(model, table, vocab, prompts[0], users[0], "grocery", exclude[0])
    n = len(ref_codes)
    assert n == ITEMS_PER_SERVICE["grocery"] - 2
    assert torch.equal(codes[0, :n], ref_codes) and (codes[0, n:] == -1).all()
    torch.testing.assert_close(scores[0, :n], ref_scores, rtol=0, atol=1e-5)  # fp32 sums, as above
    assert torch.equal(codes[1], full[1])  # nothing of this prompt's catalogue was excluded


def test_greedy_width_empty_exclusion_and_bad_inputs(setup) -> None:
    table, trie, vocab = setup
    model = _model(vocab)
    prompts = [_prompt(table, vocab, "food", events=1, seed=40)]
    codes, scores = _search(model, trie, vocab, prompts, [3], ["food"], 1)
    _, ref_scores = brute_force(model, table, vocab, prompts[0], 3, "food")
    # width 1 is greedy over codes, which need not find the best item; it must still be a valid one
    assert trie.contains("food", codes[0]).all() and torch.isfinite(scores).all()
    assert scores[0, 0] <= ref_scores[0] + 1e-5
    nothing = [torch.zeros(0, LEVELS + 1, dtype=torch.long)]
    assert torch.equal(_search(model, trie, vocab, prompts, [3], ["food"], 1, nothing)[0], codes)
    with pytest.raises(ValueError, match="end with the token"):
        _search(model, trie, vocab, prompts, [3], ["market"], 2)
    with pytest.raises(ValueError, match="beam_width"):
        _search(model, trie, vocab, prompts, [3], ["food"], 0)


@pytest.mark.gpu
def test_cuda_matches_cpu(setup) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    table, trie, vocab = setup
    model = _model(vocab)
    services = ["grocery", "food", "market"]
    prompts = [
        _prompt(table, vocab, s, events=e, seed=50 + i) for i, (s, e) in enumerate(zip(services, [4, 1, 2]))
    ]
    inputs = {**_batch(prompts), "user_ids": torch.tensor([1, 2, 3])}
    exclude = [table.codes[:2], torch.zeros(0, LEVELS + 1, dtype=torch.long), table.codes[-1:]]
    ref = constrained_beam_search(
        model, trie, vocab, **inputs, services=services, beam_width=8, exclude_codes=exclude
    )
    got = constrained_beam_search(
        model.cuda(), trie.to("cuda"), vocab, **{k: v.cuda() for k, v in inputs.items()}, services=services,
        beam_width=8, exclude_codes=exclude,
    )  # fmt: skip
    assert torch.equal(got[0].cpu(), ref[0])
    # CUDA's kernels sum in another order than the CPU's: fp32 noise on scores of order 20, 10x the CPU bound
    torch.testing.assert_close(got[1].cpu(), ref[1], rtol=0, atol=1e-4)
