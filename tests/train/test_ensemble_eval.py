"""tools/ensemble_eval.py: one run scores what `moe-rec eval`'s evaluation of it scores, two copies
of one run score the same, two models score as a float64 loop over their mean probabilities, and
a second run of another SID table or of the token-level model is refused by name."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_rec.data.positions import item_batch
from moe_rec.eval.evaluate import evaluate_model
from moe_rec.eval.exact import ServiceCatalogue, request_log_probs, request_vocabulary, top_for_requests
from moe_rec.sid.table import SIDTable
from moe_rec.train import train
from moe_rec.train.checkpoint import load_model
from moe_rec.train.data import load_split
from tests.tools import load_tool
from tests.train.conftest import ROOT, tiny_config, write_sequences

ITEM = ("model.kind=item", "model.overrides.item_loss=items", "model.overrides.item_embedding=true",
        "train.max_steps=2")  # fmt: skip


def _tool(*runs: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "tools/ensemble_eval.py"),
        "--runs",
        *map(str, runs),
        "--batch-size",
        "7",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_one_run_scores_as_moe_rec_eval_and_foreign_runs_are_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_sequences(run_dir, test=True)
    cfg = tiny_config(run_dir, *ITEM)
    train(cfg)
    table = SIDTable.load(run_dir / "sids")
    want = evaluate_model(
        load_model(run_dir / "checkpoints", "best"),
        table,
        load_split(run_dir / "sequences", "test"),
        cfg.eval,
    )
    for runs in ((run_dir,), (run_dir, run_dir)):
        done = _tool(*runs)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got["requests"] == len(load_split(run_dir / "sequences", "test"))
        assert set(got["metrics"]) == set(want)
        for key, value in want.items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-9), key

    second = tmp_path / "second"  # another model on the same table: a real ensemble
    second.mkdir()
    for part in ("sequences", "sids"):
        (second / part).symlink_to(run_dir / part)
    train(tiny_config(second, *ITEM, "train.seed=7"))
    done = _tool(run_dir, second)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)["metrics"]
    requests = load_split(run_dir / "sequences", "test").to_list()
    mean = _mean_probabilities([run_dir, second], table, requests)
    ndcg = 0.0
    for r, probs in zip(requests, mean, strict=True):
        target = int(table.rows([r["service"]], [r["target_item"]])[0])
        rank = 1 + sum(v > probs[target] for v in probs.values())
        ndcg += 1 / math.log2(rank + 1) if rank <= 10 else 0.0
    assert got["test/ndcg@10"] == pytest.approx(ndcg / len(requests), abs=1e-9)
    tool = load_tool("ensemble_eval")  # the probabilities themselves, not only the order they give
    models = [load_model(run / "checkpoints", "best") for run in (run_dir, second)]
    catalogue = ServiceCatalogue(table)
    for r, probs in zip(requests[:8], mean, strict=False):
        lp = tool.ensemble_log_probs(models, table, catalogue, [r], r["service"])[0]
        want = [probs[row] for row in catalogue.rows[r["service"]].tolist()]
        assert lp.exp().tolist() == pytest.approx(want, rel=1e-5)

    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").symlink_to(run_dir / "checkpoints")
    codes = table.codes.clone()
    a, b = (table.service_index == 0).nonzero().flatten()[:2].tolist()
    codes[[a, b]] = codes[[b, a]]  # two items of one service swap IDs: still a valid table, another one
    SIDTable(services=[table.services[i] for i in table.service_index.tolist()], item_ids=list(table.item_ids),
             codes=codes, codebook_size=table.codebook_size, max_dedup=table.max_dedup).save(other / "sids")  # fmt: skip
    done = _tool(run_dir, other)
    assert done.returncode != 0 and f"--runs {other}: its SID table differs" in done.stderr

    token = tmp_path / "token"
    token.mkdir()
    for part in ("sequences", "sids"):
        (token / part).symlink_to(run_dir / part)
    train(tiny_config(token, "train.max_steps=1"))
    done = _tool(run_dir, token)
    assert done.returncode != 0 and "holds a token-level model" in done.stderr
    assert torch.equal(SIDTable.load(run_dir / "sids").codes, table.codes)  # nothing written to the run


def _mean_probabilities(runs: list[Path], table: SIDTable, requests: list[dict]) -> list[dict[int, float]]:
    """Per request, by a plain loop: each model asked alone (the evaluation path, every item of
    the request's service ranked), each item's probability exp(score / P) / sum in float64,
    averaged over the models (table row -> mean probability)."""
    models = [load_model(run / "checkpoints", "best") for run in runs]
    catalogue = ServiceCatalogue(table)
    out = []
    for r in requests:
        mean: dict[int, float] = {}
        for model in models:
            batch = item_batch(
                [r], request_vocabulary(model, table), model.config.num_user_buckets, left_pad=True
            )
            log_probs, query, own = request_log_probs(model, batch)
            n = len(catalogue.rows[r["service"]])
            top, scores = top_for_requests(
                log_probs, [r["service"]], catalogue, n, None, query, model.item_table(), own
            )
            p = [math.exp(v / table.codes.shape[1]) for v in scores[0].double().tolist()]
            for row, v in zip(top[0].tolist(), p, strict=True):
                mean[row] = mean.get(row, 0.0) + v / sum(p) / len(models)
        out.append(mean)
    return out
