"""A whole run with critiques on small synthetic data: critiques and narratives built, text
samples and the tokenizer written, the item model trained with its text head, exported and
answered from the bundle; then ``eval --critiques``, whose "without the critique" column must
equal the plain evaluation of the same targets (recomputed from ``--save-predictions``)."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from moe_rec.cli import main
from moe_rec.config import load_config
from moe_rec.data import store
from moe_rec.data.critiques import load_rows
from moe_rec.data.item_words import item_amount_bins, item_terms
from moe_rec.eval.critiques import asks, item_facts, satisfied, with_named_terms
from moe_rec.experiment import ExperimentConfig
from moe_rec.sid.table import SIDTable

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "experiments" / "demo.yaml"


@pytest.fixture(scope="module")
def critique_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """``moe-rec run`` on 120 synthetic users with critiques on (about 40 s on 2 busy cores): the
    run directory and the arguments that made it."""
    run = tmp_path_factory.mktemp("critiques") / "run"
    args = ["--config", str(DEMO), f"run_dir={run}", "data.synthetic.num_users=120",
            "data.synthetic.items_per_service=200", "critiques.enabled=true", "critiques.min_matching_items=5",
            "sid.levels=4", "sid.codebook_size=16", "train.max_steps=6", "train.eval_every=6",
            "train.save_every=6", "train.wandb.mode=disabled"]  # fmt: skip
    assert main(["run", *args]) == 0
    return run, args


def _eval_json(args: list[str], capsys: pytest.CaptureFixture, *flags: str) -> dict:
    """``moe-rec eval`` of the run's latest checkpoint with ``flags``, its JSON report."""
    capsys.readouterr()
    assert main(["eval", *args, "--checkpoint", "latest", *flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # the run fixture
def test_a_run_with_critiques_trains_text_and_its_plain_column_matches_the_plain_evaluation(
    critique_run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, args = critique_run
    vocab = json.loads((run / "sequences" / "vocab.json").read_text())
    assert vocab["text_size"] > 256 and (run / "sequences" / "tokenizer.json").exists()
    assert any((run / "sequences" / "train").glob("part-text-*.parquet"))
    rows = [json.loads(line) for line in (run / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/text_loss" in r for r in rows if r["kind"] == "train")
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["model_kind"] == "item"

    report = _eval_json(args, capsys, "--critiques")
    requests = datasets.Dataset.from_parquet(str(run / "sequences" / "critique_test" / "*.parquet")).to_list()
    metrics = report["metrics"]
    assert metrics["all/count"] == len(requests) > 0
    for name in ("critique", "plain", "filter"):
        assert 0.0 <= metrics[f"all/{name}/ndcg@10"] <= metrics[f"all/{name}/recall@10"] <= 1.0
    families = collections.Counter(r["family"] for r in requests)  # each wording family a scope of its own
    assert {f: metrics[f"family:{f}/count"] for f in families} == families
    held = {r["family"] for r in requests if r["held_out"]}
    assert held, "the test split words half its critiques in held-out families"
    assert metrics["held_out/critique/ndcg@10"] * metrics["held_out/count"] == pytest.approx(
        sum(metrics[f"family:{f}/critique/ndcg@10"] * families[f] for f in held), abs=1e-9
    )
    for kind in {
        t for r in requests for t in r["types"]
    }:  # a type split by its wording: the two parts sum up
        parts = [f"{w}:{kind}" for w in ("seen", "held_out") if f"{w}:{kind}/count" in metrics]
        assert sum(metrics[f"{p}/count"] for p in parts) == metrics[f"{kind}/count"]
        assert sum(metrics[f"{p}/filter/ndcg@10"] * metrics[f"{p}/count"] for p in parts) == pytest.approx(
            metrics[f"{kind}/filter/ndcg@10"] * metrics[f"{kind}/count"], abs=1e-9
        )

    # the filter reads every type the record names (terms from the critique records), and puts what
    # satisfies it first: its top 10 satisfies each asked type at least as often as the plain one's
    assert report["requests_without_record"] == 0
    asked = {k.split("/")[0] for k in metrics if k.endswith("/asked")}
    assert asked == {t for r in requests for t in r["types"]}  # price, size, pack, brand, category here
    for kind in asked:
        assert metrics[f"{kind}/filter/satisfied_{kind}"] >= metrics[f"{kind}/plain/satisfied_{kind}"]
    # the reading agrees with the builder: every critique's own target is what it asks for
    cfg = load_config(ExperimentConfig, str(DEMO), args[2:])
    table = SIDTable.load(cfg.sid_dir)
    facts = item_facts(store.load_table(cfg.data_dir, store.ITEMS_DIR), table, cfg.critiques)
    named, _ = with_named_terms(requests, load_rows(cfg.critiques_dir, "test").to_list())
    for r in named:
        target, prev = table.rows([r["service"]] * 2, [r["target_item"], r["prev_item"]]).tolist()
        wanted = asks(r, target, prev, facts)
        assert set(wanted) == set(r["types"]) and all(
            satisfied(target, k, w, facts) for k, w in wanted.items()
        )

    predictions = tmp_path / "plain.jsonl"
    assert main(["eval", *args, "--checkpoint", "latest", "--save-predictions", str(predictions)]) == 0
    ranked = {(p["user"], p["service"], p["target"]): p["ranked"]
              for p in map(json.loads, predictions.read_text().splitlines())}  # fmt: skip
    gains = []
    for r in requests:
        top = ranked[(r["user"], r["service"], r["target_item"])][:10]
        gains.append(1.0 / math.log2(top.index(r["target_item"]) + 2) if r["target_item"] in top else 0.0)
    assert metrics["all/plain/ndcg@10"] == pytest.approx(sum(gains) / len(gains), abs=1e-9)

    # a filter only 10 deep reorders the top 10 alone: the same items as without the critique
    shallow_report = _eval_json([*args, "eval.filter_depth=10"], capsys, "--critiques")
    assert shallow_report["filter_depth"] == 10 and report["filter_depth"] != 10
    reports = sorted(p.name for p in (run / "eval").glob("critiques-test-*.json"))  # one per depth
    names = (f"critiques-test-{r['model']}-filter{r['filter_depth']}.json" for r in (report, shallow_report))
    assert reports == sorted(names)
    shallow = shallow_report["metrics"]
    assert shallow["all/filter/recall@10"] == pytest.approx(metrics["all/plain/recall@10"], abs=1e-12)
    assert shallow["all/critique/ndcg@10"] == pytest.approx(metrics["all/critique/ndcg@10"], abs=1e-12)


@pytest.mark.slow  # the run fixture
def test_the_bundle_reads_critiques_and_writes_narratives(critique_run: tuple[Path, list[str]]) -> None:
    from moe_rec.eval.narrate import narrative_prompt, write_narratives
    from moe_rec.serve import Recommender
    from moe_rec.serve.request import RequestError

    run, _ = critique_run
    request = datasets.Dataset.from_parquet(str(run / "sequences" / "critique_test" / "*.parquet"))[0]
    with Recommender.from_bundle(run / "bundle") as rec:
        history = _history(rec, request)
        plain = rec.recommend(history, request["service"], k=5)
        steered = rec.recommend(history, request["service"], k=5, critique=request["critique"], explain=True)
        assert [r.score for r in plain] != [r.score for r in steered]  # the critique is read
        # the plain scores beside the critique's (critique_plain_weight): swamped by a huge weight,
        # the critique ranks as no critique; the served model's config carries the weight
        rec.bundle.model.config.critique_plain_weight = 1e4
        swamped = rec.recommend(history, request["service"], k=5, critique=request["critique"])
        rec.bundle.model.config.critique_plain_weight = 0.0
        assert [r.item_id for r in swamped] == [r.item_id for r in plain]
        assert [r.item_id for r in steered] != [r.item_id for r in plain]
        assert all(r.narrative is not None and r.narrative == r.narrative.strip() for r in steered)
        assert all(r.narrative is None for r in plain)
        with pytest.raises(RequestError, match="critique"):
            rec.recommend(history, request["service"], critique="   ")
        odd = rec.recommend(history, request["service"], k=3, critique="zxqv brändname ünknown!?")
        assert len(odd) == 3  # words never seen are subwords, not an error
        # one prompt alone decodes as it does in a batch, and stops at [EOS] or the cap
        vocab, model = rec.vocab, rec.bundle.model
        row = rec.table.rows(request["service"], [request["target_item"]])[0]
        item = vocab.item_tokens(request["service"], rec.table.codes[row].tolist())
        prompt = narrative_prompt(request, item, vocab)
        second = narrative_prompt(
            request, vocab.item_tokens(request["service"], rec.table.codes[0].tolist()), vocab
        )
        together = write_narratives(model, [prompt, second], [0, 0], vocab, max_tokens=12)
        alone = write_narratives(model, [prompt], [0], vocab, max_tokens=12)
        assert together[0] == alone[0] and all(len(t) <= 12 for t in together)


def _history(rec: object, request: dict) -> list[tuple[str, str]]:
    """A critique request's history as (service, item id) events, read back from its item tokens."""
    vocab, table, ids = rec.vocab, rec.table, request["input_ids"]
    events, i = [], 1
    while i < len(ids) and vocab.service_offset <= ids[i] < vocab.code_offset:
        service, codes = vocab.decode_item(ids[i : i + vocab.tokens_per_item])
        events.append((service, table.item_ids_for(service, torch.tensor([codes]))[0]))
        i += vocab.tokens_per_item
    return events


@pytest.mark.slow  # the run fixture
def test_eval_narratives_reports_consistency_against_chance_and_titles(
    critique_run: tuple[Path, list[str]], capsys: pytest.CaptureFixture
) -> None:
    run, args = critique_run
    report = _eval_json(args, capsys, "--narratives")
    m = report["metrics"]
    tests = datasets.Dataset.from_parquet(str(run / "sequences" / "test" / "*.parquet"))
    assert m["requests"] == min(len(tests), 300) and len(report["examples"]) == min(5, m["requests"])
    assert 0.0 < m["chance_mrr"] < m["title_mrr"] <= 1.0  # a title names its item far above chance
    assert 0.0 < m["mrr"] <= 1.0 and 0.0 <= m["hit@10"] <= 1.0 and 0.0 < m["distinct-1"] <= 1.0
    assert all(
        m[k] != m[k] or 0.0 <= m[k] <= 1.0 for k in ("faithful_precision", "faithful_coverage")
    )  # or NaN
    # a value the item holds is grounded too: grounded counts the item's values and the history's
    assert (
        m["faithful_precision"] != m["faithful_precision"]
        or m["faithful_precision"] <= m["faithful_grounded"] <= 1
    )
    assert 0.0 <= m["format_repeated_list"] <= 1.0  # written with a list item twice, shown merged
    assert 0.0 <= m["self_bleu"] <= 1.0 and 0.0 <= m["format_valid"] <= min(
        m["format_ended"], m["format_clean"]
    )
    assert m["personal_requests"] <= m["requests"] and (
        m["personal_auc"] != m["personal_auc"] or 0 <= m["personal_auc"] <= 1
    )
    refs = report["references"]
    held_out = datasets.Dataset.from_parquet(str(run / "narratives" / "test.parquet")).filter(
        lambda r: r["held_out"]
    )
    assert 0 < refs["requests"] <= min(len(held_out), 300)
    for baseline in ("model", "title", "nearest_item", "user_last"):
        assert 0.0 <= refs[baseline]["bleu"] <= 1.0 and 0.0 <= refs[baseline]["rouge_l"] <= 1.0
    assert (run / "eval" / f"narratives-test-{report['model']}.json").exists()


@pytest.mark.slow  # the run fixture
def test_price_bins_and_critique_validation_train_export_and_serve(
    critique_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """model.overrides.item_price_bins with train.critique_valid: the trainer sets every item's price
    bin, validation reports the critique requests and their mean with the plain ones (best_metric
    valid/mixed/ndcg@10 picks `best`), and the bundle carries the bins and reads a critique; with the
    named previous phrases, the item terms, the size and pack bins and both copy paths on, the bundle
    keeps their weights and tables and explains."""
    from moe_rec.serve import Recommender

    run, args = critique_run
    other = tmp_path / "run"
    other.mkdir()
    for stage in ("data", "sids", "critiques", "narratives", "sequences"):
        (other / stage).symlink_to(run / stage)
    args = [a if not a.startswith("run_dir=") else f"run_dir={other}" for a in args]
    args += ["train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.critique_valid=true",
             "train.best_metric=valid/mixed/ndcg@10", "model.overrides.item_words=true",
             "model.overrides.item_price_bins=4", "model.overrides.item_phrases=true",
             "model.overrides.critique_named_previous=true", "model.overrides.narrative_copy=true",
             "model.overrides.narrative_history_copy=true", "model.overrides.item_terms=true",
             "model.overrides.item_amounts=true"]  # fmt: skip
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (other / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert len(valid) == 2
    for r in valid:
        mixed = (r["valid/ndcg@10"] + r["valid/critique/ndcg@10"]) / 2
        assert r["valid/mixed/ndcg@10"] == pytest.approx(mixed)
    assert main(["export", *args]) == 0
    request = datasets.Dataset.from_parquet(str(run / "sequences" / "critique_test" / "*.parquet"))[0]
    with Recommender.from_bundle(other / "bundle") as rec:
        bins = rec.bundle.model.item_price_bin
        assert int(bins.min()) >= -1 and int(bins.max()) == 3 and bool((bins >= 0).any())
        model = rec.bundle.model
        assert model.named_previous_weight is not None and model.history_copy_weight is not None
        # the terms' table travels with the weights: the bundle's is the catalogue's, row by row
        cfg = load_config(ExperimentConfig, str(DEMO), args[2:])
        sids = SIDTable.load(cfg.sid_dir)
        keys = [(sids.services[int(s)], i) for s, i in zip(sids.service_index, sids.item_ids, strict=True)]
        offset = rec.vocab.text_offset
        expect = item_terms(
            store.load_table(cfg.data_dir, store.ITEMS_DIR), keys, rec.bundle.tokenizer, offset
        )
        assert model.phrase_fields == 4 and torch.equal(model.item_terms, expect)
        assert bool((expect != model.config.pad_token_id).any())
        amounts = item_amount_bins(store.load_table(cfg.data_dir, store.ITEMS_DIR), keys)  # and the sizes'
        assert torch.equal(torch.stack([model.item_size_bin, model.item_pack_bin], 1), amounts)
        assert bool((amounts[:, 0] >= 0).any()) and bool((amounts[:, 1] > 0).any())
        history = _history(rec, request)
        steered = rec.recommend(history, request["service"], k=5, critique=request["critique"], explain=True)
        assert len(steered) == 5 and all(r.narrative is not None for r in steered)


@pytest.mark.slow  # the run fixture
def test_reword_critiques_ranks_as_the_evaluation_and_rewrites_by_family(
    critique_run: tuple[Path, list[str]], capsys: pytest.CaptureFixture
) -> None:
    from tests.tools import load_tool

    run, args = critique_run
    report = _eval_json(args, capsys, "--critiques")["metrics"]
    family = max((k.split("/")[0] for k in report if k.startswith("family:") and k.endswith("/count")),
                 key=lambda scope: report[f"{scope}/count"]).removeprefix("family:")  # fmt: skip
    tool = load_tool("reword_critiques")
    found = tool.main([*args, "--checkpoint", "latest", "--family", family, "--sub", "(?i)^\\W*\\w+\\W*=>"])
    built, rewritten = found["as built"], found["rewritten"]
    assert built["all/count"] == report[f"family:{family}/count"]  # re-encoded, ranked as eval ranked it
    for name in ("critique", "plain", "filter"):
        assert built[f"all/{name}/ndcg@10"] == pytest.approx(
            report[f"family:{family}/{name}/ndcg@10"], abs=1e-9
        )
    assert rewritten["all/plain/ndcg@10"] == pytest.approx(built["all/plain/ndcg@10"], abs=1e-9)
    assert "rewritten" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="known: "):
        tool.main([*args, "--family", "no_such_family"])
