"""Sharding of the train split over ranks, the collator, and clear errors for configs and data."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from moe_rec.config import ConfigError
from moe_rec.data.positions import columnar_item_batch, item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, user_bucket
from moe_rec.data.vocab import BOS, CRITIQUE, EOS, EXPLAIN, PAD, Vocabulary
from moe_rec.train import train
from moe_rec.train.data import (
    Collator,
    CritiqueWordDropout,
    DataPosition,
    ItemCollator,
    ShardedTrainData,
    length_grouped_batches,
    load_split,
    service_steps,
)
from tests.train.conftest import tiny_config


def _shards(run_dir: Path, world: int, **kw: int) -> list[ShardedTrainData]:
    ds = load_split(run_dir / "sequences", "train")
    args = dict(micro_batch_size=4, grad_accum=2, seed=0) | kw
    return [
        ShardedTrainData(ds, rank=r, world_size=world, collator=Collator(64), **args) for r in range(world)
    ]


def _varied_lengths(n: int, seed: int) -> datasets.Dataset:
    """``n`` samples of 1-60 tokens (skewed short, like real histories), each with its row index."""
    lengths = np.minimum(np.random.default_rng(seed).geometric(0.06, n), 60)
    return datasets.Dataset.from_dict({"row": list(range(n)), "input_ids": [[7] * int(k) for k in lengths]})


def _row_indices(rows: datasets.Dataset) -> list[int]:
    """A collator that hands back which samples a micro batch holds."""
    return list(rows["row"])


@pytest.mark.parametrize("tokens", [0, 120])
def test_ranks_see_disjoint_samples_and_run_the_same_steps(tokens: int) -> None:
    ds = _varied_lengths(400, seed=int(np.random.SeedSequence().entropy % 2**32))
    shards = [ShardedTrainData(ds, micro_batch_size=4, micro_batch_tokens=tokens, grad_accum=2, rank=r,
                               world_size=3, seed=0, collator=_row_indices) for r in range(3)]  # fmt: skip
    steps = shards[0].steps_per_epoch
    assert {s.steps_per_epoch for s in shards} == {steps}
    seen = [i for s in shards for st in range(steps) for mb in s.micro_batches(0, st) for i in mb]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, on any rank
    # what is not seen is the dropped remainder: fewer micro batches than one step's 3 ranks x 2
    plan = shards[0].plan(0)
    dropped = np.concatenate([[], *plan[steps * 6 :]]).astype(int).tolist()
    assert len(plan) - steps * 6 < 6
    if tokens:
        assert sorted(seen + dropped) == list(range(400))
    else:  # and the last 400 % 4 samples of the shuffle, which fill no micro batch
        assert len(set(seen + dropped)) == len(seen + dropped) == 400 - 400 % 4
        assert steps == 400 // (3 * 4 * 2)


def test_length_grouped_batches_by_hand() -> None:
    lengths = np.array([3, 1, 2, 3, 1])
    for budget, expected in [
        (4, [[1, 1], [2], [3], [3]]),
        (6, [[1, 1, 2], [3, 3]]),
        (2, [[1, 1], [2], [3], [3]]),
    ]:
        batches = length_grouped_batches(lengths, budget, np.random.default_rng(0))
        assert sorted(sorted(lengths[b].tolist()) for b in batches) == expected
        assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("budget", [64, 256, 1000])
def test_length_grouped_batches_fit_the_budget_and_waste_little(budget: int) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    lengths = np.array([len(x) for x in _varied_lengths(3000, seed)["input_ids"]])
    batches = length_grouped_batches(lengths, budget, np.random.default_rng(seed))
    assert sorted(np.concatenate(batches).tolist()) == list(range(3000))
    padded = [len(b) * lengths[b].max() for b in batches]
    assert all(p <= budget or len(b) == 1 for p, b in zip(padded, batches))
    # random batches of the same mean size pad the short samples up to the longest one in the batch
    size = max(1, round(3000 / len(batches)))
    order = np.random.default_rng(seed).permutation(3000)
    random_padded = sum(len(c) * lengths[c].max() for c in np.array_split(order, range(size, 3000, size)))
    assert lengths.sum() / sum(padded) > 0.9 > lengths.sum() / random_padded, seed


def test_service_steps_by_hand() -> None:
    a = [np.array([0]), np.array([1]), np.array([2]), np.array([3]), np.array([4])]
    b = [np.array([10, 11]), np.array([12])]
    plan = service_steps([a, b], per_step=2, rng=np.random.default_rng(0))
    steps = [np.concatenate(plan[i : i + 2]).tolist() for i in range(0, 6, 2)]
    assert sorted(steps) == [[0, 1], [2, 3], [10, 11, 12]]  # whole steps, one service each
    assert [x.tolist() for x in plan[6:]] == [[4]]  # a's leftover last, the incomplete step
    assert sorted(np.concatenate(plan).tolist()) == [0, 1, 2, 3, 4, 10, 11, 12]


@pytest.mark.parametrize("tokens", [0, 120])
def test_batch_by_service_gives_every_step_one_service_on_every_rank(tokens: int) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    ds = _varied_lengths(600, seed)
    services = np.random.default_rng(seed).choice(3, size=600, p=[0.5, 0.3, 0.2])
    shards = [ShardedTrainData(ds, micro_batch_size=4, micro_batch_tokens=tokens, grad_accum=2, rank=r,
                               world_size=2, seed=0, collator=_row_indices, sample_services=services)
              for r in range(2)]  # fmt: skip
    steps = shards[0].steps_per_epoch
    per_step = [[i for s in shards for mb in s.micro_batches(1, st) for i in mb] for st in range(steps)]
    mixed = [st for st, rows in enumerate(per_step) if len(set(services[rows])) > 1]
    assert len(mixed) <= 2 and all(st >= steps - 2 for st in mixed), (seed, mixed)  # leftovers, at the end
    assert len({int(services[rows[0]]) for rows in per_step}) == 3  # every service gets steps
    seen = [i for rows in per_step for i in rows]
    assert len(seen) == len(set(seen))
    plan = shards[0].plan(1)
    dropped = np.concatenate([[], *plan[steps * 4 :]]).astype(int).tolist()
    assert len(plan) - steps * 4 < 4
    if tokens:  # every sample in some micro batch; fixed-size batches drop each service's remainder
        assert sorted(seen + dropped) == list(range(600))
    else:
        assert len(seen + dropped) == sum(n - n % 4 for n in np.bincount(services))
    # the same steps as without services would be, shuffled: a step is as long as one of them
    assert steps == len(plan) // 4


def test_main_services_is_each_samples_most_common_service() -> None:
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    domains = [rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist() for _ in range(200)]
    ds = datasets.Dataset.from_dict({"domain_ids": domains})
    expect = [max(range(4), key=lambda s, d=d: (d.count(s), -s)) for d in domains]  # ties: lower index
    assert ShardedTrainData.main_services(ds).tolist() == expect


@pytest.mark.parametrize("tokens", [0, 60])
def test_order_is_deterministic_per_epoch_and_resumes_exactly(run_dir: Path, tokens: int) -> None:
    a, b = (
        _shards(run_dir, world=2, micro_batch_tokens=tokens)[0],
        _shards(run_dir, world=2, micro_batch_tokens=tokens)[0],
    )
    assert not all(np.array_equal(x, y) for x, y in zip(a.plan(0), a.plan(1)))
    per_epoch = a.steps_per_epoch
    stream = a(DataPosition())
    steps = [next(stream) for _ in range(per_epoch + 3)]  # crosses the epoch boundary
    assert steps[per_epoch - 1][0] == DataPosition(0, per_epoch) and steps[per_epoch][0] == DataPosition(1, 1)
    pos, _ = steps[per_epoch - 2]
    resumed = b(pos)
    for (p, batches), (q, again) in zip(steps[per_epoch - 1 :], (next(resumed) for _ in range(4))):
        assert p == q
        for x, y in zip(batches, again):
            torch.testing.assert_close(x, y)


def test_collator_right_pads_and_hashes_users(run_dir: Path) -> None:
    ds = load_split(run_dir / "sequences", "train")
    rows = [ds[0], ds[1], ds[2]]
    batch = Collator(64)(rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert (batch["input_ids"][i, n:] == PAD).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["domain_ids"][i, n:] == r["domain_ids"][-1]).all()
        assert batch["attention_mask"][i].sum().item() == n
        assert batch["user_ids"][i].item() == user_bucket(r["user"], 64)


def test_world_size_the_data_cannot_feed_is_an_error(run_dir: Path) -> None:
    with pytest.raises(DataError, match=r"96 samples.*world_size 16 x grad_accum 2 x micro_batch_size 4"):
        _shards(run_dir, world=16)
    with pytest.raises(
        DataError,
        match=r"96 samples.*world_size 2 x grad_accum 2 x length-grouped micro batches of <= 4000 tokens \(1 of them\)",
    ):
        _shards(run_dir, world=2, micro_batch_tokens=4000)


def test_config_typo_names_the_key(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.micro_batchsize.*did you mean 'train\.micro_batch_size'"):
        tiny_config(run_dir, "train.micro_batchsize=4")
    with pytest.raises(ConfigError, match=r"train\.resume.*must be one of"):
        tiny_config(run_dir, "train.resume=sometimes")


def test_missing_sequences_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"vocab\.json not found: no sequences"):
        train(tiny_config(tmp_path / "empty"))


def test_cli_reports_a_config_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_rec.train.__main__ import main

    assert main(["--config", "configs/experiments/demo.yaml", f"run_dir={run_dir}", "train.lr=fast"]) == 2
    assert "train.lr: expected float" in capsys.readouterr().err


def test_item_positions_count_each_event_once_and_each_text_token_once() -> None:
    """item_positions: as many positions as split_positions makes of each sample (events, [BOS],
    [CRITIQUE] and text tokens), for plain windows, critique samples and requests."""
    from moe_rec.data.positions import split_positions

    vocab = Vocabulary(services=("a", "b"), levels=3, codebook_size=8, dedup_size=4, text_size=20)
    t0 = vocab.text_offset
    a, b = vocab.item_tokens("a", [1, 2, 3, 0]), vocab.item_tokens("b", [4, 5, 6, 1])
    samples = [
        [BOS, *a, *b, *a],
        [BOS, *a, CRITIQUE, t0 + 3, t0 + 4, t0 + 5, *b],
        [BOS, *b, *a, EXPLAIN, t0, t0 + 19, EOS],
        [BOS, *a, CRITIQUE, t0 + 1, vocab.service_token("b")],  # a request: the asked service closes it
    ]
    ds = datasets.Dataset.from_dict({"input_ids": samples})
    expect = [len(split_positions(ids, [0] * len(ids), vocab).tokens) for ids in samples]
    assert expect == [4, 7, 7, 4]
    got = ShardedTrainData.item_positions(ds, vocab)
    # a request's trailing service token is no position but one token: counted as one more
    assert got.tolist() == [4, 7, 7, 5]


def _event_rows(rng: np.random.Generator, vocab: Vocabulary, n: int) -> list[dict]:
    """``n`` training samples of 0-12 whole events of random services, each event labelled or
    not (as a critique sample's history is not), token labels as the sequences stage writes them."""
    rows = []
    for r in range(n):
        ids, doms, labels = [1], [int(rng.integers(len(vocab.services)))], [IGNORE_INDEX]
        for _ in range(int(rng.integers(0, 13))):
            service = vocab.services[int(rng.integers(len(vocab.services)))]
            codes = [
                *rng.integers(vocab.codebook_size, size=vocab.levels).tolist(),
                int(rng.integers(vocab.dedup_size)),
            ]
            toks = vocab.item_tokens(service, codes)
            ids += toks
            doms += [vocab.service_index(service)] * len(toks)
            labels += [IGNORE_INDEX] + (toks[1:] if rng.random() < 0.7 else [IGNORE_INDEX] * (len(toks) - 1))
        rows.append({"user": f"u{r}", "input_ids": ids, "domain_ids": doms, "labels": labels})
    return rows


@pytest.mark.parametrize("text_size", [0, 50])
def test_columnar_item_batch_equals_the_row_by_row_batch(text_size: int) -> None:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(
        services=("a", "b", "c"), levels=4, codebook_size=16, dedup_size=3, text_size=text_size
    )
    for size in (1, 7, 40):
        rows = _event_rows(rng, vocab, size)
        ds = datasets.Dataset.from_list(rows)
        picked = ds.select(rng.permutation(size).tolist())  # a selection, as a micro batch is
        fast = columnar_item_batch(picked.with_format("arrow")[:], vocab, 32)
        slow = item_batch(list(picked), vocab, 32)
        assert fast is not None and fast.keys() == slow.keys(), seed
        for key in slow:
            assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), (seed, key)
        assert torch.equal(ItemCollator(vocab, 32)(picked)["labels"], slow["labels"])


def test_columnar_item_batch_leaves_text_and_requests_to_the_row_by_row_batch() -> None:
    vocab = Vocabulary(services=("a", "b"), levels=2, codebook_size=8, dedup_size=2, text_size=20)
    rows = _event_rows(np.random.default_rng(0), vocab, 4)
    critique = dict(rows[0])
    critique["input_ids"] = [*rows[0]["input_ids"], CRITIQUE, vocab.text_offset + 3]
    critique["domain_ids"] = [*rows[0]["domain_ids"], 0, 0]
    critique["labels"] = [*rows[0]["labels"], IGNORE_INDEX, IGNORE_INDEX]
    request = {k: v for k, v in rows[1].items() if k != "labels"}
    request["input_ids"] = [*request["input_ids"], vocab.service_token("b")]
    request["domain_ids"] = [*request["domain_ids"], 1]
    mixed = [critique, *rows[1:]]
    ds = datasets.Dataset.from_list(mixed)
    assert columnar_item_batch(ds.with_format("arrow")[:], vocab, 8) is None
    got, want = ItemCollator(vocab, 8)(ds), item_batch(mixed, vocab, 8)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (
        columnar_item_batch(datasets.Dataset.from_list([request]).with_format("arrow")[:], vocab, 8) is None
    )


def _critique_samples(n: int) -> tuple[datasets.Dataset, Vocabulary, CritiqueWordDropout]:
    """``n`` critique samples of the text-sample builder (two to six words each), and word dropout
    at p = .5 over its tokenizer."""
    from tests.data.test_text_samples import EVENTS, _builders, _row

    plain, text = _builders(critiques_per_user=1)
    words = "anything cheaper please a budget pick in lotions".split()
    rows = []
    for k in range(n):
        critique = " ".join(words[k % 3 : k % 3 + 2 + k % 5])
        (sample,) = text.train_samples(f"u{k}", EVENTS, [_row(3, "train", critique)], [])
        rows.append({**sample, "user": f"u{k}"})
    dropout = CritiqueWordDropout(0.5, text.tokenizer.word_starts(), plain.vocab.text_offset)
    return datasets.Dataset.from_list(rows), plain.vocab, dropout


def test_word_dropout_in_the_stream_is_seeded_and_keeps_every_label() -> None:
    ds, vocab, dropout = _critique_samples(24)

    def shard(word_dropout: CritiqueWordDropout | None) -> ShardedTrainData:
        return ShardedTrainData(ds, micro_batch_size=4, grad_accum=2, rank=0, world_size=1, seed=3,
                                collator=ItemCollator(vocab, 8), word_dropout=word_dropout)  # fmt: skip

    a, b, plain = shard(dropout), shard(dropout), shard(None)
    first = next(a(DataPosition(1, 0)))[1]
    again = next(b(DataPosition(1, 0)))[1]  # a resumed run draws the same words
    for x, y in zip(first, again, strict=True):
        for key in x:
            torch.testing.assert_close(x[key], y[key])
    undropped = next(plain(DataPosition(1, 0)))[1]
    fewer = 0
    for x, y in zip(first, undropped, strict=True):  # same samples, shorter critiques, same targets
        assert torch.equal(x["user_ids"], y["user_ids"])
        fewer += int(y["attention_mask"].sum() - x["attention_mask"].sum())
        torch.testing.assert_close(
            x["labels"][x["labels"] != IGNORE_INDEX], y["labels"][y["labels"] != IGNORE_INDEX]
        )
    assert fewer > 0


def test_word_dropout_is_refused_where_it_cannot_work(run_dir: Path) -> None:
    from moe_rec.train.config import PrivacyConfig, TrainConfig

    with pytest.raises(ValueError, match="critique_word_dropout must be in"):
        TrainConfig(critique_word_dropout=1.0)
    with pytest.raises(ConfigError, match="critique_word_dropout"):
        TrainConfig(
            critique_word_dropout=0.2, privacy=PrivacyConfig(enabled=True, noise_multiplier=1.0), clip=0.0
        )
    with pytest.raises(ConfigError, match="critique_word_dropout needs an item-level model"):
        train(tiny_config(run_dir, "train.critique_word_dropout=0.2"))
