"""Greedy narrative decoding: the repetition rule against a brute force over every n-gram, the
merged list items against lists rendered without their repeats, and the KV-cached decoding
against the uncached reference on random models."""

from __future__ import annotations

import random

import pytest
import torch

from moe_rec.data.narratives import _and
from moe_rec.data.positions import code_token_ranges, item_batch
from moe_rec.data.vocab import BOS, CRITIQUE, PAD, Vocabulary
from moe_rec.eval.narrate import merge_repeats, narrative_prompt, repeated, write_narratives
from moe_rec.model import MoERecForItemPrediction, build_config, model_class


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_repeated_bans_exactly_what_would_repeat_an_ngram(seed: int, n: int) -> None:
    rng = random.Random(seed)
    text = [rng.randrange(4) for _ in range(rng.randrange(12))]
    grams = {tuple(text[i : i + n]) for i in range(len(text) - n + 1)}
    expected = {
        t for t in range(4) if len(text) >= n - 1 and tuple([*text[len(text) - n + 1 :], t][-n:]) in grams
    }
    assert repeated(text, n) == expected
    assert repeated(text, 0) == set()


# names that share words but never end one another ("skin care" / "skin care products")
NAMES = ["wigs", "nail polish", "nail art", "hair extensions", "lip gloss", "lip liner", "skin care",
         "skin care products", "o'keeffe's", "black & white"]  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
def test_merge_repeats_writes_a_list_as_if_its_repeats_were_never_drawn(seed: int) -> None:
    """A narrative whose lists name an item twice in a row reads as the templates would write the
    list without the repeat; lists without adjacent repeats are left as they are."""
    rng = random.Random(seed)
    written, expected = [], []
    for _ in range(rng.randrange(1, 4)):
        items = [rng.choice(NAMES) for _ in range(rng.randrange(1, 5))]
        distinct = [x for i, x in enumerate(items) if i == 0 or x != items[i - 1]]
        opener = rng.choice(["your taste: mostly", "with", "a lot of"])
        end = rng.choice([".", ", often from nivea."])
        written.append(f"{opener} {_and(items)}{end}")
        expected.append(f"{opener} {_and(distinct)}{end}")
    assert merge_repeats(" ".join(written)) == " ".join(expected)
    assert merge_repeats(" ".join(expected)) == " ".join(expected)
    assert merge_repeats(" ".join(expected).upper()) == " ".join(expected).upper()  # case aside


TEXT = 30  # subwords of the test vocabulary
NARRATE_VOCAB = Vocabulary(services=("a", "b", "c"), levels=3, codebook_size=8, dedup_size=4, text_size=TEXT)


def _narrating_model(seed: int, kind: str) -> MoERecForItemPrediction:
    """A random tiny item-level model with a text head: ``moe`` (domain_user router, running
    profile), ``dense`` (its dense twin), or ``items`` (MoE with per-item vectors and the text prior,
    as the demo's model). Weights ten times the usual init: at 0.02 the last position's output is
    almost its own embedding, and every prompt of a batch writes the same narrative."""
    torch.manual_seed(seed)
    start, stop = NARRATE_VOCAB.text_offset, NARRATE_VOCAB.size
    fields: dict = {}
    if kind in ("items", "copy", "history"):
        fields = dict(item_loss="items", item_embedding=True, num_items=12, item_text=True, item_text_dim=5,
                      item_text_prior=True)  # fmt: skip
    if kind in ("copy", "history"):
        fields.update(item_word_slots=4, narrative_copy=True)  # the words' table without the critique term
    if kind == "history":
        fields.update(narrative_history_copy=True)
    cfg = build_config(
        "tiny", vocab_size=NARRATE_VOCAB.size, num_domains=3, num_user_buckets=16, router_mode="domain_user",
        code_token_ranges=code_token_ranges(NARRATE_VOCAB), text_token_range=[start, stop],
        initializer_range=0.2, **fields,
    )  # fmt: skip
    cfg = cfg.dense_twin() if kind == "dense" else cfg
    model = model_class(cfg)(cfg).eval()
    if kind in ("items", "copy", "history"):
        g = torch.Generator().manual_seed(seed)
        model.set_train_catalogue(
            CATALOGUE_CODES, torch.tensor([NARRATE_VOCAB.service_token("abc"[i % 3]) for i in range(12)])
        )
        model.set_item_text(torch.randn(12, 5, generator=g))
        with torch.no_grad():
            model.item_embed.weight.normal_(0, 0.1)
    if kind in ("copy", "history"):  # random item words, copy gates large enough to steer the greedy choice
        words = start + torch.randint(stop - start, (12, 4, 4), generator=g)
        words[torch.rand(words.shape, generator=g) < 0.3] = PAD
        model.set_item_words(words)
        with torch.no_grad():
            model.copy_weight.weight.normal_(0, 0.5, generator=g)
            if kind == "history":  # shares are at most 1: larger gates
                model.history_copy_weight.weight.normal_(0, 1.0, generator=g)
    return model


CATALOGUE_CODES = torch.stack([torch.arange(12) % 8, (torch.arange(12) * 3) % 8, torch.arange(12) // 3 % 8,
                               torch.arange(12) % 4], dim=1)  # fmt: skip  # distinct (service, codes) keys


def _prompts(seed: int, n: int, catalogue: bool = False) -> list[dict]:
    """``n`` narrative prompts of random histories (0 to 6 events), half with a critique of 1 to 5
    words, each for a random item of a random service (``catalogue``: the events and the item
    random items of :data:`CATALOGUE_CODES`, each with its service)."""
    rng = random.Random(seed)
    v, prompts = NARRATE_VOCAB, []
    for _ in range(n):
        ids, doms = [BOS], [0]
        for _ in range(rng.randrange(7)):
            s = rng.randrange(3)
            codes = [rng.randrange(8) for _ in range(3)] + [rng.randrange(4)]
            if catalogue:
                row = rng.randrange(12)
                s, codes = row % 3, CATALOGUE_CODES[row].tolist()
            ids += v.item_tokens(v.services[s], codes)
            doms += [s] * v.tokens_per_item
        doms[0] = doms[1] if len(doms) > 1 else 0
        if rng.random() < 0.5:
            words = [v.text_offset + rng.randrange(TEXT) for _ in range(rng.randrange(1, 6))]
            ids += [CRITIQUE, *words]
            doms += [doms[-1]] * (len(words) + 1)
        asked = rng.randrange(3)
        codes = [rng.randrange(8) for _ in range(3)] + [rng.randrange(4)]
        if catalogue:
            row = rng.randrange(12)
            asked, codes = row % 3, CATALOGUE_CODES[row].tolist()
        request = {"input_ids": [*ids, v.service_token(v.services[asked])], "domain_ids": [*doms, asked]}
        item = v.item_tokens(v.services[asked], codes)
        prompts.append(narrative_prompt(request, item, v))
    return prompts


CASES = [("moe", 0, 1, 10, 3), ("moe", 1, 5, 16, 3), ("moe", 2, 8, 24, 2), ("dense", 3, 5, 16, 3),
     ("dense", 4, 7, 20, 0), ("items", 5, 6, 16, 3), ("items", 6, 4, 12, 1), ("copy", 7, 6, 16, 3),
     ("copy", 8, 5, 12, 0), ("history", 10, 6, 16, 3), ("history", 11, 7, 12, 0)]  # fmt: skip


@pytest.mark.parametrize("kind, seed, n, max_tokens, no_repeat", CASES)
def test_cached_narratives_match_the_uncached_reference(
    kind: str, seed: int, n: int, max_tokens: int, no_repeat: int
) -> None:
    """The KV-cached greedy decoding writes exactly the subwords of the uncached one (every step a
    whole forward over freshly padded prompts), with the same logits at every step up to fp32
    rounding, on prompts of different lengths in one batch, some narratives ending early."""
    model = _narrating_model(seed, kind)
    prompts = _prompts(seed, n, catalogue=kind in ("copy", "history"))
    users = [random.Random(seed + i).randrange(16) for i in range(n)]
    runs = {}
    for use_cache in (False, True):
        steps: list = []
        texts = write_narratives(model, prompts, users, NARRATE_VOCAB, max_tokens, no_repeat,
                                 use_cache=use_cache, step_logits=steps)  # fmt: skip
        runs[use_cache] = texts, steps
    (plain, plain_steps), (cached, cached_steps) = runs[False], runs[True]
    assert cached == plain
    assert len(cached_steps) == len(plain_steps) >= 1
    for (live_p, logits_p), (live_c, logits_c) in zip(plain_steps, cached_steps, strict=True):
        assert live_c == live_p
        # fp32 both ways; only the padding and the summation order differ, by about 1e-6 of the
        # largest logit (measured: 3e-6 on logits up to 8, 3.4e-5 up to 34 with the history's copy)
        scale = max(1.0, float(logits_p.abs().max()))
        torch.testing.assert_close(logits_c, logits_p, rtol=1e-5, atol=2e-6 * scale)
    assert all(len(t) <= max_tokens for t in cached)


def test_the_parity_cases_read_their_prompts_and_end_at_different_steps() -> None:
    """What makes the parity above worth having: prompts of one batch write different narratives,
    and in some batches a narrative ends at [EOS] while others go on (its row leaves the cache)."""
    mixed = 0
    for kind, seed, n, max_tokens, no_repeat in CASES:
        texts = write_narratives(_narrating_model(seed, kind), _prompts(seed, n, catalogue=kind in ("copy", "history")),
                                 [0] * n, NARRATE_VOCAB, max_tokens, no_repeat)  # fmt: skip
        assert n == 1 or len({tuple(t) for t in texts}) > 1
        mixed += len({len(t) for t in texts}) > 1
    assert mixed >= 3


def test_no_prompts_no_narratives() -> None:
    model = _narrating_model(0, "dense")
    assert write_narratives(model, [], [], NARRATE_VOCAB) == []
    assert write_narratives(model, [], [], NARRATE_VOCAB, use_cache=False) == []


@pytest.mark.parametrize("use_cache", [False, True])
def test_copy_gates_write_the_explained_items_words(use_cache: bool) -> None:
    """narrative_copy reads the item the prompt explains, not one of its history: with field 0's gate
    at +50 every narrative whose item has field-0 words opens with one of them, and stays with them
    while they last (no-repeat 1)."""
    model = _narrating_model(9, "copy")
    with torch.no_grad():
        model.copy_weight.weight.zero_()
        model.copy_weight.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    prompts = _prompts(9, 8, catalogue=True)
    texts = write_narratives(model, prompts, [0] * 8, NARRATE_VOCAB, 6, 1, use_cache=use_cache)
    t0, checked = NARRATE_VOCAB.text_offset, 0
    for prompt, text in zip(prompts, texts, strict=True):
        row = int(
            model.explained_rows(item_batch([{**prompt, "user": ""}], NARRATE_VOCAB, 1)["item_tokens"])[0, -1]
        )
        own = {int(w) - t0 for w in model.item_words[row, 0] if int(w) != PAD}
        if own:
            checked += 1
            assert set(text[: len(own)]) == own
    assert checked >= 4
