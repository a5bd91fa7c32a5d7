"""The item-level model from a real DeepSpeed checkpoint to a bundle and a served answer: the bundle
has no beam-search trie, reproduces the engine's logits, evaluates like the checkpoint, and the
Recommender (Python and HTTP) returns the items exact scoring ranks first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_rec.data.sequences import prompt
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.evaluate import evaluate_model
from moe_rec.eval.exact import ServiceCatalogue, rank_exact
from moe_rec.export import export_checkpoint, load_bundle
from moe_rec.model import MoERecForItemPrediction
from moe_rec.model.item_model import TEXT_PRIOR_INIT
from moe_rec.serve import Recommender
from moe_rec.serve.config import ServeConfig
from moe_rec.sid.table import SIDTable
from moe_rec.train.checkpoint import load_model
from moe_rec.train.data import load_split
from tests.train.conftest import ITEMS, VOCAB, tiny_config, write_catalogue, write_sequences

pytestmark = pytest.mark.slow


def _request(table: SIDTable, history: list[tuple[str, str]], service: str) -> dict:
    """The test request the Recommender builds for ``history`` asking ``service``."""
    items = [(s, table.codes_for(s, [i])[0].tolist()) for s, i in history]
    return {"user": "", "service": service, **prompt(VOCAB, items, service)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from moe_rec.train import train

    run = tmp_path_factory.mktemp("item") / "run"
    write_sequences(run)
    write_catalogue(run)
    summary = train(tiny_config(run, "model.kind=item", "train.eval_every=4", "train.max_eval_samples=0"))
    return run, summary


def test_bundle_reproduces_the_checkpoint_and_serves_its_ranking(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    run, summary = trained
    out = export_checkpoint(
        run / "checkpoints", tmp_path / "bundle", tag="latest"
    )  # the probe is the last step's
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_kind"] == "item" and manifest["verification"]["passed"]
    assert manifest["verification"]["max_abs_diff"] <= 1e-5
    assert not any(name.endswith("sid_trie.safetensors") for name in manifest["files"])
    bundle = load_bundle(out)
    assert isinstance(bundle.model, MoERecForItemPrediction) and bundle.trie is None
    with torch.no_grad():
        logits = bundle.model(**summary["probe"]["batch"]).logits[:2]
    # fp32 both; the engine ran the same weights inside DeepSpeed (another summation order allowed)
    torch.testing.assert_close(logits, summary["probe"]["logits"], rtol=1e-5, atol=1e-5)

    valid = load_split(run / "sequences", "valid")
    checkpoint = load_model(run / "checkpoints", "latest")
    table = SIDTable.load(run / "sids")
    cfg = EvalConfig(split="valid", batch_size=5)
    assert evaluate_model(bundle.model, bundle.table, valid, cfg) == evaluate_model(
        checkpoint, table, valid, cfg
    )

    history = [("grocery", "1"), ("market", "4"), ("grocery", "2")]
    request = _request(table, history, "grocery")
    expected = rank_exact(checkpoint, ServiceCatalogue(table), [request], k=ITEMS, exclude_seen=True)[0]
    expected_ids = [str(table.item_ids[r]) for r in expected.tolist() if r >= 0]
    with Recommender.from_bundle(out, ServeConfig(device="cpu")) as rec:
        got = rec.recommend(history, "grocery", k=5)
        assert [r.item_id for r in got] == expected_ids[:5]
        assert {"1", "2"}.isdisjoint(r.item_id for r in got)
        assert got[0].fields["title"] == f"grocery {got[0].item_id}"
        everything = rec.recommend(history, "grocery", k=ITEMS)
        assert len(everything) == ITEMS - 2  # all unseen items, and no more
        assert all(a.score >= b.score for a, b in zip(everything, everything[1:]))


@pytest.mark.parametrize(("text", "prior"), [(False, False), (True, False), (True, True), (True, "by_service")],
                         ids=["vector", "vector+text", "vector+text+prior", "vector+text+prior-by-service"])  # fmt: skip
def test_item_embedding_trains_exports_and_serves(tmp_path: Path, text: bool, prior: bool | str) -> None:
    """The per-item term through ZeRO-3 (its item-key buffers, and with item_text the catalogue's
    text embeddings, included): the exported bundle reproduces the engine's logits and query, and
    serving ranks as exact scoring of the checkpoint."""
    from moe_rec.train import train

    run = tmp_path / "run"
    write_sequences(run)
    write_catalogue(run)
    zero3 = json.loads(Path("configs/deepspeed/zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tables
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    args = ("model.kind=item", "model.overrides.item_loss=items", "model.overrides.item_embedding=true",
            "model.overrides.item_negatives=4", f"train.deepspeed={tmp_path / 'zero3.json'}",
            *(["model.overrides.item_text=true"] if text else []),
            *(["model.overrides.item_text_prior=true"] if prior else []),
            *(["model.overrides.item_text_prior_by_service=true"] if prior == "by_service" else []))  # fmt: skip
    summary = train(tiny_config(run, *args))
    checkpoint = load_model(run / "checkpoints", "latest")
    # validation under ZeRO-3 (the per-item vectors gathered from their shards) equals the checkpoint's
    valid = evaluate_model(checkpoint, SIDTable.load(run / "sids"), load_split(run / "sequences", "valid"),
                           EvalConfig(split="valid", max_samples=8))  # fmt: skip
    for key in ("valid/ndcg@10", "valid/recall@20"):
        assert summary["valid"][key] == pytest.approx(valid[key], abs=1e-9), key
    assert checkpoint.item_embed.weight.abs().sum() > 0  # trained away from zero
    if text:  # the text embeddings travel with the weights, and every item's vector reads them
        assert checkpoint.item_text.shape == (len(SIDTable.load(run / "sids")), 384)
        assert checkpoint.item_text.norm(dim=1).allclose(torch.ones(1), atol=1e-4)  # MiniLM: unit vectors
        rows = torch.arange(len(checkpoint.item_text))
        with torch.no_grad():
            plain = checkpoint.item_embed(rows) + checkpoint.item_text @ checkpoint.text_proj.weight.T
        torch.testing.assert_close(checkpoint.item_table()[:, : plain.shape[1]], plain)
    table = SIDTable.load(run / "sids")
    rows = checkpoint.item_rows(table.codes, table.service_index + VOCAB.service_offset)
    assert torch.equal(rows, torch.arange(len(table)))  # every catalogue item finds its own vector
    out = export_checkpoint(run / "checkpoints", tmp_path / "bundle", tag="latest")
    bundle = load_bundle(out)
    assert torch.equal(bundle.model.item_keys, checkpoint.item_keys)
    if prior == "by_service":  # one trained weight per service travels with the bundle
        assert bundle.model.text_prior.shape == (checkpoint.config.num_domains,)
        assert torch.equal(bundle.model.text_prior, checkpoint.text_prior)
        assert not torch.equal(checkpoint.text_prior, torch.full_like(checkpoint.text_prior, TEXT_PRIOR_INIT))
    with torch.no_grad():  # no labels: the loss needs the training catalogue, serving does not
        probe = bundle.model(**{k: v for k, v in summary["probe"]["batch"].items() if k != "labels"})
    torch.testing.assert_close(probe.logits[:2], summary["probe"]["logits"], rtol=1e-5, atol=1e-5)  # as above
    history = [("market", "3"), ("market", "4")]
    request = _request(table, history, "market")
    expected = rank_exact(checkpoint, ServiceCatalogue(table), [request], k=ITEMS, exclude_seen=True)[0]
    with Recommender.from_bundle(out, ServeConfig(device="cpu")) as rec:
        got = rec.recommend(history, "market", k=ITEMS)
    assert [r.item_id for r in got] == [str(table.item_ids[r]) for r in expected.tolist() if r >= 0]
