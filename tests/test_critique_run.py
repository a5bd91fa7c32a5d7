"""A whole run with critiques on small synthetic data: critiques and narratives built, text
samples and the tokenizer written, the item model trained with its text head, exported and
answered from the bundle; then ``eval --critiques``, whose "without the critique" column must
equal the plain evaluation of the same targets (recomputed from ``--save-predictions``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest

from moe_rec.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"


@pytest.mark.slow  # the whole pipeline on 120 users (about a minute on 2 busy cores)
def test_a_run_with_critiques_trains_text_and_its_plain_column_matches_the_plain_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    args = ["--config", str(DEMO), f"run_dir={run}", "data.synthetic.num_users=120",
            "data.synthetic.items_per_service=200", "critiques.enabled=true", "critiques.min_matching_items=5",
            "sid.levels=4", "sid.codebook_size=16", "train.max_steps=6", "train.eval_every=6",
            "train.save_every=6", "train.wandb.mode=disabled"]  # fmt: skip
    assert main(["run", *args]) == 0
    vocab = json.loads((run / "sequences" / "vocab.json").read_text())
    assert vocab["text_size"] > 256 and (run / "sequences" / "tokenizer.json").exists()
    assert any((run / "sequences" / "train").glob("part-text-*.parquet"))
    rows = [json.loads(line) for line in (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/text_loss" in r for r in rows if r["kind"] == "train")
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["model_kind"] == "item"

    capsys.readouterr()
    assert main(["eval", *args, "--checkpoint", "latest", "--critiques", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    requests = datasets.Dataset.from_parquet(str(run / "sequences" / "critique_test" / "*.parquet")).to_list()
    metrics = report["metrics"]
    assert metrics["all/count"] == len(requests) > 0
    for name in ("critique", "plain", "filter"):
        assert 0.0 <= metrics[f"all/{name}/ndcg@10"] <= metrics[f"all/{name}/recall@10"] <= 1.0

    predictions = tmp_path / "plain.jsonl"
    assert main(["eval", *args, "--checkpoint", "latest", "--save-predictions", str(predictions)]) == 0
    ranked = {(p["user"], p["service"], p["target"]): p["ranked"]
              for p in map(json.loads, predictions.read_text().splitlines())}  # fmt: skip
    gains = []
    for r in requests:
        top = ranked[(r["user"], r["service"], r["target_item"])][:10]
        gains.append(1.0 / math.log2(top.index(r["target_item"]) + 2) if r["target_item"] in top else 0.0)
    assert metrics["all/plain/ndcg@10"] == pytest.approx(sum(gains) / len(gains), abs=1e-9)
