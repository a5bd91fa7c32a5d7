"""SASRec with full cross-entropy: causality and padding invariance, the loss against a float64 hand
computation, the evaluation path against a plain-Python rank loop (ties, exclude_seen), learning
beyond the most-popular baseline on synthetic data, selection on validation only (test scored
once), determinism / resume / reuse, the config section, and the CLI end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from moe_rec.baselines import sasrec
from moe_rec.baselines.config import SASRecConfig
from moe_rec.baselines.sasrec import (
    SASRec,
    ServiceData,
    build_service_data,
    evaluate_split,
    fit_service,
    pad_left,
    rank_items,
    training_batch,
)
from moe_rec.cli import main
from moe_rec.config import ConfigError, load_config
from moe_rec.data import store
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.prepare import prepare
from moe_rec.eval.metrics import RankingMetrics
from moe_rec.eval.popularity import evaluate_events
from moe_rec.experiment import ExperimentConfig

TINY = SASRecConfig(
    hidden=16, layers=2, heads=2, dropout=0.0, max_len=8, batch_size=16, epochs=4, eval_every=1
)


def tiny_model(num_items: int = 30, seed: int = 0, **overrides: object) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(**{**TINY.__dict__, **overrides})
    return SASRec(num_items, cfg).double().eval()


def test_later_items_do_not_change_earlier_outputs() -> None:
    model = tiny_model()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 12]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([20, 21, 22])
    a, b = model.scores(model(seq)), model.scores(model(changed))  # (1, 8, N)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 5:], b[:, 5:])  # the change is visible where it may be


def test_padding_side_and_width_do_not_change_the_last_item() -> None:
    model = tiny_model()
    items = [5, 2, 17, 9]
    unpadded = model.scores(model(torch.tensor([items])))[0, -1]
    left = model.scores(model(torch.tensor([[0, 0, 0, *items]])))[0, -1]
    right = model.scores(model(torch.tensor([[*items, 0, 0]])))[0, 3]
    torch.testing.assert_close(left, unpadded, rtol=0, atol=1e-10)
    torch.testing.assert_close(right, unpadded, rtol=0, atol=1e-10)
    # and in a batch beside a longer sequence (pad_left to its width)
    batch = pad_left([items, [1, 2, 3, 4, 5, 6, 7]])
    torch.testing.assert_close(model.scores(model(batch))[0, -1], unpadded, rtol=0, atol=1e-10)


def test_loss_equals_a_float64_hand_computation() -> None:
    model = tiny_model(num_items=6)
    inputs, targets = training_batch([[1, 2, 3, 4], [5, 6], [2, 2, 3]], max_len=8)
    assert targets.tolist() == [[2, 3, 4], [0, 0, 6], [0, 2, 3]]
    hidden = model(inputs).tolist()  # (B, L, D)
    emb = model.item_emb.weight.tolist()  # (N + 1, D)
    losses = []
    for b, row in enumerate(targets.tolist()):
        for t, target in enumerate(row):
            if target == 0:
                continue
            logits = [sum(h * e for h, e in zip(hidden[b][t], emb[i])) for i in range(1, 7)]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            losses.append(log_z - logits[target - 1])
    expected = sum(losses) / len(losses)  # mean over the 6 real targets, all 6 items in the softmax
    assert model.loss(inputs, targets).item() == pytest.approx(expected, rel=1e-12)


def reference_rank(scores: list[float], target: int, exclude: set[int]) -> int:
    """1-based rank of item ``target`` (1..N) among the non-excluded items, higher score first, ties
    by lower item index; 0 when excluded."""
    if target in exclude:
        return 0
    better = 0
    for i, s in enumerate(scores, start=1):
        if (
            i != target
            and i not in exclude
            and (s > scores[target - 1] or (s == scores[target - 1] and i < target))
        ):
            better += 1
    return better + 1


def reference_metrics(ranks: list[int], ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"recall@{k}"] = sum(1.0 for r in ranks if 0 < r <= k) / len(ranks)
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in ranks if 0 < r <= k) / len(ranks)
    return out


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_ranking_of_tied_random_scores_matches_a_loop(exclude_seen: bool) -> None:
    rng = random.Random(0)
    n, b = 40, 300
    scores = [[float(rng.randint(0, 6)) for _ in range(n)] for _ in range(b)]  # many ties
    targets = [rng.randint(1, n) for _ in range(b)]
    histories = [rng.sample(range(1, n + 1), rng.randint(0, 38)) for _ in range(b)]  # some leave < 20 items
    exclude = histories if exclude_seen else None
    ranked = rank_items(torch.tensor(scores), 20, exclude)
    metrics = RankingMetrics(["s"], prefix="test")
    metrics.update(ranked, torch.tensor(targets), ["s"] * b)
    got = metrics.compute()
    ranks = [
        reference_rank(s, t, set(h) if exclude_seen else set()) for s, t, h in zip(scores, targets, histories)
    ]
    for name, value in reference_metrics(ranks).items():
        assert got[f"test/s/{name}"] == pytest.approx(value, abs=1e-12), name
    for row, h in zip(ranked.tolist(), histories):  # real items only, no repeats, nothing excluded
        real = [i for i in row if i != -1]
        assert len(set(real)) == len(real) and (not exclude_seen or not set(real) & set(h))
        assert row == real + [-1] * (20 - len(real))


def random_service(n_items: int = 50, users: int = 60, seed: int = 0) -> ServiceData:
    rng = random.Random(seed)
    train, requests = [], {"valid": [], "test": []}
    for _ in range(users):
        seq = [rng.randint(1, n_items) for _ in range(rng.randint(3, 14))]
        train.append(seq[:-2])
        requests["valid"].append((seq[:-2], seq[-2]))
        requests["test"].append((seq[:-1], seq[-1]))
    return ServiceData("s", [f"i{i:03d}" for i in range(n_items)], train, requests)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_model_evaluation_matches_a_loop(exclude_seen: bool) -> None:
    data = random_service()
    model = tiny_model(num_items=data.num_items, seed=3)
    metrics = RankingMetrics(["s"], prefix="test")
    evaluate_split(model, data, "test", metrics, exclude_seen, batch_size=7)
    got = metrics.compute()
    ranks = []
    with torch.no_grad():
        for history, target in data.requests["test"]:  # one request at a time, unpadded
            scores = model.scores(model(torch.tensor([history[-model.max_len :]]))[0, -1]).tolist()
            ranks.append(reference_rank(scores, target, set(history) if exclude_seen else set()))
    assert got["test/s/count"] == len(ranks)
    for name, value in reference_metrics(ranks).items():
        assert got[f"test/s/{name}"] == pytest.approx(value, abs=1e-12), name


def test_service_data_from_events() -> None:
    rows = []
    histories = {
        "u1": ("c a b a d", "train train train valid test"),
        "u2": ("b c", "train test"),
        "u3": ("d", "train"),
    }
    for user, (items, splits) in histories.items():
        seq, splits = items.split(), splits.split()
        for position, (item, split) in enumerate(zip(seq, splits)):
            rows.append({"user": user, "service": "s", "item_id": item, "position": position, "split": split})
    rows.append({"user": "u1", "service": "other", "item_id": "zz", "position": 0, "split": "train"})
    events = pa.Table.from_pylist(rows)
    catalogue = pa.Table.from_pylist([{"service": "s", "item_id": "e"}, {"service": "other", "item_id": "y"}])
    data = build_service_data(events, catalogue, "s")
    assert data.items == ["a", "b", "c", "d", "e"]  # catalogue item "e" is ranked too; index = order + 1
    assert data.train == [[3, 1, 2]]  # u1's training items; u2 has one, u3 none to predict
    assert data.requests["valid"] == [([3, 1, 2], 1)]
    assert data.requests["test"] == [([3, 1, 2, 1], 4), ([2], 3)]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    cfg = DataConfig(num_shards=1, synthetic=SyntheticConfig(num_users=300, items_per_service=80, seed=1))
    prepare(cfg, out)
    return out


def test_sasrec_learns_more_than_popularity(synthetic_dir: Path, tmp_path: Path) -> None:
    events = store.load_table(synthetic_dir)
    items = store.load_table(synthetic_dir, store.ITEMS_DIR)
    cfg = SASRecConfig(hidden=32, heads=1, dropout=0.2, batch_size=32, epochs=6, eval_every=3, lr=3e-3)
    services = sorted(set(events.column("service").to_pylist()))
    metrics = RankingMetrics(services, prefix="valid")
    for service in services:
        data = build_service_data(events, items, service)
        model, _ = fit_service(data, cfg, tmp_path / service)
        evaluate_split(model, data, "valid", metrics)
    ours = metrics.compute()["valid/ndcg@10"]
    popular = evaluate_events(events, "valid")["valid/ndcg@10"]
    assert ours > 1.3 * popular, (ours, popular)  # measured: .165 vs .097


def test_selection_reads_validation_only_and_keeps_the_best_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_service(users=80, seed=1)
    calls: list[str] = []
    real = sasrec.evaluate_split

    def spy(model: SASRec, data: ServiceData, split: str, *args: object, **kwargs: object) -> None:
        calls.append(split)
        real(model, data, split, *args, **kwargs)

    monkeypatch.setattr(sasrec, "evaluate_split", spy)
    # the test targets are not part of what the fit depends on
    scrambled = ServiceData(data.service, data.items, data.train, {**data.requests, "test": []})
    assert scrambled.fingerprint() == data.fingerprint()
    cfg = SASRecConfig(**{**TINY.__dict__, "epochs": 5, "eval_every": 2, "lr": 1e-2})
    model, meta = fit_service(data, cfg, tmp_path)
    assert calls == ["valid"] * 3  # epochs 2, 4 and the last, 5; never the test split
    scores = [h["valid/s/ndcg@10"] for h in meta["history"]]
    assert [h["epoch"] for h in meta["history"]] == [2, 4, 5]
    assert meta["best_epoch"] == meta["history"][scores.index(max(scores))]["epoch"]
    metrics = RankingMetrics(["s"], prefix="valid")
    real(model, data, "valid", metrics)  # the returned weights are the best epoch's
    assert metrics.compute()["valid/s/ndcg@10"] == pytest.approx(max(scores), abs=1e-12)
    saved = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_deterministic_resumable_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_service(users=50, seed=2)
    cfg = SASRecConfig(**{**TINY.__dict__, "dropout": 0.3, "epochs": 4, "patience": 50})
    a, _ = fit_service(data, cfg, tmp_path / "a")
    b, _ = fit_service(data, SASRecConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "b")
    b, meta_b = fit_service(data, cfg, tmp_path / "b")  # resumes after epoch 2
    assert meta_b["epochs_run"] == 4 and len(meta_b["history"]) == 4
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    monkeypatch.setattr(sasrec, "_validate", lambda *a, **k: pytest.fail("a finished run is retrained"))
    c, meta_c = fit_service(data, cfg, tmp_path / "a")
    assert meta_c["best_epoch"] == meta_b["best_epoch"]
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_an_interrupted_fit_of_another_config_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_service(users=50, seed=3)
    cfg = SASRecConfig(**{**TINY.__dict__, "epochs": 4, "eval_every": 1, "patience": 50})
    first, _ = fit_service(data, cfg, tmp_path)
    real, calls = sasrec._validate, []

    def crash_on_second(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed after its first evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(sasrec, "_validate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fit_service(
            data, SASRecConfig(**{**cfg.__dict__, "seed": 1}), tmp_path
        )  # another config, same directory
    monkeypatch.setattr(sasrec, "_validate", real)
    again, meta = fit_service(data, cfg, tmp_path)  # the first config: retrained, same weights
    assert meta["epochs_run"] == 4
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())


def test_config_section_and_its_typos(tmp_path: Path) -> None:
    cfg = load_config(ExperimentConfig, None, ["sasrec.hidden=32", "sasrec.services=[beauty]"])
    assert cfg.sasrec.hidden == 32 and cfg.sasrec.services == ["beauty"] and cfg.sasrec.max_len == 50
    with pytest.raises(ConfigError, match=r"unknown key 'sasrec\.hiden' \(did you mean 'sasrec\.hidden'\?\)"):
        load_config(ExperimentConfig, None, ["sasrec.hiden=32"])
    path = tmp_path / "x.yaml"
    path.write_text("sasrec:\n  dropuot: 0.2\n")
    with pytest.raises(
        ConfigError, match=r"x\.yaml: unknown key 'sasrec\.dropuot' \(did you mean 'sasrec\.dropout'\?\)"
    ):
        load_config(ExperimentConfig, path)
    with pytest.raises(ConfigError, match="divisible"):
        load_config(ExperimentConfig, None, ["sasrec.heads=3"])


def test_cli_end_to_end(synthetic_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(synthetic_dir)
    args = [
        f"run_dir={tmp_path}",
        "sasrec.epochs=2",
        "sasrec.hidden=16",
        "sasrec.services=[grocery, delivery]",
    ]
    assert main(["eval", "--baseline", "sasrec", *args]) == 0
    report = json.loads((tmp_path / "eval" / "test-sasrec.json").read_text())
    assert report["model"] == "sasrec"
    metrics = report["metrics"]
    assert {"test/grocery/ndcg@20", "test/delivery/recall@5", "test/macro/ndcg@10"} <= set(metrics)
    assert "test/marketplace/count" not in metrics
    events = store.load_table(synthetic_dir).to_pylist()
    assert metrics["test/count"] == sum(
        1 for e in events if e["split"] == "test" and e["service"] != "marketplace"
    )
    for service in ("grocery", "delivery"):
        meta = json.loads((tmp_path / "baselines" / "sasrec" / service / "config.json").read_text())
        assert meta["epochs_run"] == 2 and (tmp_path / "baselines" / "sasrec" / service / "model.pt").exists()
    assert main(["eval", "--baseline", "sasrec", *args, "sasrec.services=[nope]"]) == 2  # one-line error
