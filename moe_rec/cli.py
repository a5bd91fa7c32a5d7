"""The ``moe-rec`` command line: config file first, dotted ``key=value`` overrides after it.

    moe-rec run             --config configs/experiments/demo.yaml          # the whole pipeline
    moe-rec data prepare    --config configs/experiments/amazon2014.yaml    # read, validate, split
    moe-rec data stats      runs/amazon2014/data                            # print stats.json
    moe-rec data forget     --config ... --user u42 --users-file ids.txt    # delete users' events
    moe-rec critiques build --config ...                                    # critiques + narratives
    moe-rec sids build      --config ... sid.quantizer=rqvae                # semantic IDs
    moe-rec sequences build --config ...                                    # token samples
    moe-rec train           --config ... train.deepspeed=configs/deepspeed/zero3.json
    moe-rec eval            --config ... --checkpoint best eval.split=test     # Recall/NDCG@K
    moe-rec audit           --config ... --checkpoint best                  # membership AUC, canary exposure
    moe-rec export          --config ... --tag best --dtype bfloat16           # -> <run_dir>/bundle
    moe-rec recommend       runs/demo/bundle --service grocery --history grocery:g00004 delivery:d00014
    moe-rec serve           runs/demo/bundle --port 8000                    # HTTP service

A command's results (metrics, recommendations, stats) go to stdout, as one JSON document with
``--json``; progress and log lines go to stderr. Bad input (a config typo, a missing file, a
malformed row in strict mode: a :class:`moe_rec.errors.MoeRecError`) ends with one line that says
what and where, exit code 2; ``--debug`` shows the full traceback instead. Anything else is a bug
and shows its traceback.

Each command is a small handler (``cmd_*``: arguments in, results out) around a stage function
(``stage_*``: config in, files and numbers out) that ``moe-rec run`` calls in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import transformers
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moe_rec import stages
from moe_rec.config import ConfigError, dump_config, load_config, to_dict
from moe_rec.console import console, plain, print_json, results
from moe_rec.data.cold_start import read_cold_items
from moe_rec.data.schema import DataError
from moe_rec.errors import MoeRecError
from moe_rec.experiment import ExperimentConfig
from moe_rec.serve.config import DEFAULT_K, LOG_LEVELS, ServeConfig

if TYPE_CHECKING:
    from moe_rec.serve import Recommender


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(ExperimentConfig, args.config, args.overrides)


def _stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"prepared data ({stats.get('source', '?')})")
    for col in ("service", "users", "items", "interactions", "train", "valid", "test"):
        table.add_column(col, justify="left" if col == "service" else "right")
    for service, s in stats["services"].items():
        splits = s.get("splits", {})
        table.add_row(
            service, f"{s['users']:,}", f"{s['items']:,}", f"{s['interactions']:,}",
            *(f"{splits.get(k, 0):,}" for k in ("train", "valid", "test")),
        )  # fmt: skip
    t = stats["total"]
    table.add_row("[bold]all", f"{t['users']:,}", f"{t['items']:,}", f"{t['interactions']:,}", "", "", "")
    return table


def _report_lines(stats: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in stats.get("reports", {}).items():
        lines.append(
            f"{name}: read {r['rows_read']:,}, kept {r['rows_kept']:,}, rejected {r['rows_rejected']:,}"
            + (f" {r['rejected']}" if r["rejected"] else "")
            + (f"; notes {r['notes']}" if r["notes"] else "")
        )
    return lines


def _print_data_stats(stats: dict[str, Any], to: Console) -> None:
    to.print(_stats_table(stats))
    to.print(f"users in several services: {stats['total']['users_in_several_services']:,}")
    for line in _report_lines(stats):
        to.print(line)


def _print_sid_stats(stats: dict[str, Any]) -> None:
    table = Table(title="semantic IDs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in (
        "items",
        "unique_ids",
        "collision_rate",
        "max_dedup_depth",
        "encode_seconds",
        "quantize_seconds",
    ):
        if key in stats:
            value = stats[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else f"{value:,}")
    for level, use in enumerate(stats.get("level_usage", []), start=1):
        table.add_row(f"level {level} codes used", f"{use:.3f}" if isinstance(use, float) else str(use))
    console.print(table)


def _critique_tables(stats: dict[str, Any]) -> list[Table]:
    """Pairs kept and skipped per split, the shares of each type, and the retrieval leakage."""
    pairs = Table(title="critiques: adjacent pairs per split")
    for col in ("split", "service", "considered", "kept", "skipped (by reason)"):
        pairs.add_column(
            col, justify="left" if col in ("split", "service", "skipped (by reason)") else "right"
        )
    for split, per in stats["pairs"].items():
        for service, c in per.items():
            skipped = ", ".join(
                f"{k.split(':', 1)[1]} {v:,}" for k, v in c.items() if k.startswith("skipped:")
            )
            pairs.add_row(split, service, f"{c.get('considered', 0):,}", f"{c.get('kept', 0):,}", skipped)
    types = Table(title="critiques: share of rows naming each type")
    types.add_column("split")
    names = list(dict.fromkeys(t for shares in stats["type_shares"].values() for t in shares))
    for name in names:
        types.add_column(name, justify="right")
    types.add_column("held out", justify="right")
    for split, shares in stats["type_shares"].items():
        held = f"{stats['held_out_rows'][split]:,} / {stats['rows'][split]:,}"
        types.add_row(split, *(f"{shares.get(n, 0):.3f}" for n in names), held)
    leak = Table(title="critiques: BM25 over titles, target's top-1 / top-10 share (random: chance)")
    for col in ("split", "scope", "n", "critique", "previous title", "previous + critique", "chance"):
        leak.add_column(col, justify="left" if col in ("split", "scope") else "right")
    for split, scopes in stats["leakage"].items():
        for scope, m in scopes.items():
            pair = [
                f"{m[f'{q}_top1']:.4f} / {m[f'{q}_top10']:.4f}"
                for q in ("critique", "previous", "previous+critique")
            ]
            leak.add_row(
                split, scope, f"{m['n']:,}", *pair, f"{m['chance_top1']:.5f} / {m['chance_top10']:.5f}"
            )
    return [pairs, types, leak]


def _print_critique_stats(stats: dict[str, Any], to: Console) -> None:
    for table in _critique_tables(stats):
        to.print(table)
    to.print(f"unavailable types (type:reason): {stats['unavailable']}")
    to.print(f"leakage guard dropped: {stats['guard_dropped']}")


def _print_narrative_stats(stats: dict[str, Any], to: Console) -> None:
    to.print(
        "narratives: " + ", ".join(f"{s} {n:,} (held-out families {stats['held_out_rows'][s]:,})"
                                   for s, n in stats["rows"].items())
    )  # fmt: skip
    to.print(f"skipped: {stats['skipped']}")
    to.print(f"why (test): {stats['why'].get('test', {})}")


# -- the stages: config in, files and numbers out (the commands below and `moe-rec run` call them) --


def stage_prepare(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """Read, validate and split ``cfg.data`` into ``out``; returns its ``stats.json``."""
    from moe_rec.data.prepare import prepare

    console.print(f"preparing [bold]{cfg.data.source}[/] data into {out}")
    stats = prepare(cfg.data, out)
    dump_config(cfg, cfg.run_dir / "config.yaml")
    _print_data_stats(stats, console)
    stages.mark(out, stages.data_print(cfg))
    console.print(f"wrote {out}/stats.json")
    return stats


def stage_critiques(cfg: ExperimentConfig) -> dict[str, Any]:
    """Critiques (and, unless ``critiques.narratives.enabled`` is off, narratives) of the prepared
    data, into ``<run_dir>/critiques`` and ``<run_dir>/narratives``; returns both stats."""
    from moe_rec.data.critiques import build_critiques
    from moe_rec.data.narratives import build_narratives
    from moe_rec.sid.embed import TextEncoder
    from moe_rec.sid.item_text import item_texts

    encoder: list[TextEncoder] = []  # made on first use: only a service without categories needs it

    def embed(rows: Any) -> Any:
        if not encoder:
            encoder.append(TextEncoder.from_config(cfg.sid.encoder, cfg.embedding_cache))
        return encoder[0].encode(item_texts(rows)).numpy()

    console.print(f"building critiques from {cfg.data_dir} into {cfg.critiques_dir}")
    stats = {"critiques": build_critiques(cfg.data_dir, cfg.critiques_dir, cfg.critiques, embed)}
    _print_critique_stats(stats["critiques"], console)
    console.print(f"wrote {cfg.critiques_dir} ({stats['critiques']['seconds']:.1f}s)")
    if cfg.critiques.narratives.enabled:
        stats["narratives"] = build_narratives(cfg.data_dir, cfg.narratives_dir, cfg.critiques)
        _print_narrative_stats(stats["narratives"], console)
        console.print(f"wrote {cfg.narratives_dir} ({stats['narratives']['seconds']:.1f}s)")
    stages.mark(cfg.critiques_dir, stages.critiques_print(cfg))
    return stats


def stage_forget(
    data_dir: Path, users: Sequence[str], *, cfg: ExperimentConfig | None = None, rebuild: bool = False
) -> dict[str, Any]:
    """Delete ``users``' events from a prepared directory (:mod:`moe_rec.data.forget`), remove the
    run's token samples made from them (rebuilt with ``rebuild``, which needs ``cfg``), and say what
    still holds the users; returns the report ``--json`` prints (counts, never ids)."""
    from moe_rec.data.forget import forget_users, holders, invalidate_critiques, invalidate_sequences

    run_dir = cfg.run_dir if cfg is not None else data_dir.parent
    result = forget_users(data_dir, users)
    report = result.to_dict()
    report["sequences"] = report["critiques"] = "unchanged"
    if result.forgotten:
        texts = invalidate_critiques(run_dir)  # critiques and narratives name users too
        report["critiques"] = "removed" if texts else "none"
        removed = invalidate_sequences(run_dir / "sequences")
        report["sequences"] = "removed" if removed else "none"
        if rebuild and texts and cfg.critiques.enabled:
            stage_critiques(cfg)
            report["critiques"] = "rebuilt"
        if rebuild and removed:
            stage_sequences(cfg)
            report["sequences"] = "rebuilt"
    # what existed when the users were deleted (now, or at their earlier deletion) still holds them
    since = time.time() if result.forgotten else max(map(_epoch, result.already.values()), default=0) + 1
    report["still_holding"] = [{"path": str(path), "why": why} for path, why in holders(run_dir, since)]
    return report


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _print_forget(report: dict[str, Any], data_dir: Path, cfg: ExperimentConfig | None) -> None:
    """The deletion's counts, then, loudly, what was made from the users and still holds them."""

    def say(text: str) -> None:
        results.print(text, soft_wrap=True)  # one line each, however long

    per = ", ".join(f"{s} {n:,}" for s, n in report["events_per_service"].items())
    if report["users_forgotten"]:
        say(
            f"forgot {report['users_forgotten']:,} users: {report['events_removed']:,} events removed ({per}) "
            f"from every split; {report['shards_rewritten']} shards rewritten, {report['shards_removed']} removed; "
            f"{data_dir / 'stats.json'} updated; logged to {data_dir / 'forgotten.jsonl'} (keyed hashes, no ids)"
        )
    if report["users_already_forgotten"]:
        say(f"{report['users_already_forgotten']:,} users were forgotten before: nothing left to remove")
    config = f"--config <experiment> run_dir={cfg.run_dir}" if cfg else "--config <experiment>"
    if report["sequences"] == "removed":
        say(
            f"the token samples built from this data were removed; rebuild them with `moe-rec sequences build {config}`"
        )
    elif report["sequences"] == "rebuilt":
        say("the token samples were rebuilt from the forgotten data")
    if report["critiques"] == "removed":
        say(
            f"the critiques and narratives (they name users) were removed; `moe-rec critiques build {config}`"
        )
    elif report["critiques"] == "rebuilt":
        say("the critiques and narratives were rebuilt from the forgotten data")
    if report["still_holding"]:
        say(
            "[bold red]still holding these users[/] (made before the deletion): retrain from the forgotten data "
            "from scratch (move checkpoints/ away first: a run resumes from checkpoints/latest), re-export, "
            "then delete these (docs/privacy.md):"
        )
        for h in report["still_holding"]:
            say(f"  {escape(h['path'])}: {h['why']}")


def stage_sids(cfg: ExperimentConfig, data_dir: Path, out: Path) -> dict[str, Any]:
    """Semantic IDs of the items prepared in ``data_dir``, written to ``out``; returns their stats."""
    from moe_rec.data.store import load_items
    from moe_rec.sid.build import build_sids

    items = load_items(data_dir).data.table
    console.print(f"building semantic IDs for {items.num_rows:,} items ({cfg.sid.quantizer}) into {out}")
    stats = build_sids(items, cfg.sid, out, cfg.embedding_cache)
    _print_sid_stats(stats)
    stages.mark(out, stages.sids_print(cfg, data_dir))
    console.print(f"wrote {out}/stats.json")
    return stats


def stage_sequences(cfg: ExperimentConfig) -> dict[str, int]:
    """Token samples of every split and the vocabulary (and the cold-start benchmark's held-out
    items, with ``sequences.cold_items``); returns the sample count per split."""
    from moe_rec.data.canaries import CANARY_FILE, read_canaries
    from moe_rec.data.cold_start import COLD_FILE, pick_cold_items, write_cold_items
    from moe_rec.data.holdout import HOLDOUT_SPLIT, read_holdout_record
    from moe_rec.data.sequences import SequenceBuilder, write_sequences
    from moe_rec.sid.table import META_FILE, SIDTable

    if not (cfg.sid_dir / META_FILE).exists():
        raise DataError(
            f"{cfg.sid_dir / META_FILE} not found: a sequence spells items by their semantic IDs; build "
            f"them first with `moe-rec sids build --config <experiment> run_dir={cfg.run_dir}`"
        )
    table = SIDTable.load(cfg.sid_dir)
    vocab = table.vocabulary()
    builder = SequenceBuilder(vocab, table.code_map(), cfg.sequences)
    counts = write_sequences(cfg.data_dir, builder, cfg.sequences_dir)
    if cfg.critiques.enabled:  # critique and narrative samples, and the text tokens they need
        from moe_rec.data.text_samples import write_text_samples

        if stages.read(cfg.critiques_dir) is None:
            raise DataError(
                f"critiques.enabled but {cfg.critiques_dir} has no finished critiques; build them first "
                f"with `moe-rec critiques build --config <experiment> run_dir={cfg.run_dir}`"
            )
        narratives = cfg.narratives_dir if cfg.critiques.narratives.enabled else None
        vocab, text_counts = write_text_samples(
            cfg.data_dir, builder, cfg.critiques_dir, narratives, cfg.sequences_dir
        )
        counts |= text_counts
    cold = pick_cold_items(builder.item_codes, cfg.sequences.cold_items)
    write_cold_items(cfg.sequences_dir, cfg.sequences.cold_items, cold)
    if cold:
        console.print(
            f"cold start: {len(cold):,} items kept out of training -> {cfg.sequences_dir / COLD_FILE}"
        )
    if held := read_holdout_record(cfg.sequences_dir):
        console.print(
            f"membership audit: {held['users']:,} users ({held['share']:.0%}) kept out of training, their "
            f"{held['samples']:,} windows in {cfg.sequences_dir / HOLDOUT_SPLIT}"
        )
    if planted := read_canaries(cfg.sequences_dir):
        console.print(
            f"exposure audit: {len(planted[0])} canaries planted x {cfg.sequences.canaries.copies} users, "
            f"{len(planted[1])} controls -> {cfg.sequences_dir / CANARY_FILE}"
        )
    (cfg.sequences_dir / "vocab.json").write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
    console.print(f"vocabulary: {vocab.size:,} tokens ({len(vocab.services)} services, {vocab.levels}x"
                  f"{vocab.codebook_size} codes + {vocab.dedup_size} dedup + {vocab.text_size} text)")  # fmt: skip
    console.print(
        "samples: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" -> {cfg.sequences_dir}"
    )
    stages.mark(cfg.sequences_dir, stages.sequences_print(cfg))
    return counts


def stage_eval(
    cfg: ExperimentConfig,
    *,
    checkpoint: str = "best",
    bundle: str | None = None,
    baseline: str | None = None,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint of the run (exact scoring or beam search, by model kind), a bundle, or
    a baseline (most popular, SASRec, text neighbours) on ``cfg.eval.split``; writes and returns the
    report ``{"model", "config", "metrics"}`` (``<run_dir>/eval/<split>-<model>.json``). On a
    cold-start benchmark's sequences, cold and warm targets are reported too. A checkpoint's
    metrics also go to the run's ``metrics.jsonl`` and W&B run; ``predictions``: every request's
    ranking to that JSONL file (:mod:`moe_rec.eval.predictions`; the model's, not a baseline's)."""
    if baseline is not None and predictions is not None:
        raise ConfigError("--save-predictions: the baselines do not write their rankings; evaluate a model")
    cold = read_cold_items(cfg.sequences_dir)  # the cold-start benchmark's items, when it is one
    split, exclude_seen = cfg.eval.split, cfg.eval.exclude_seen
    if baseline == "popularity":
        from moe_rec.eval.popularity import evaluate_popularity

        name = "popularity"
        metrics = evaluate_popularity(cfg.data_dir, split=split, exclude_seen=exclude_seen, cold=cold)
    elif baseline == "sasrec":
        from moe_rec.baselines.sasrec import evaluate_sasrec

        name = "sasrec"
        out_dir = cfg.run_dir / "baselines" / "sasrec"
        metrics = evaluate_sasrec(cfg.data_dir, out_dir, cfg.sasrec, split, exclude_seen, cold=cold)
    elif baseline == "text":
        from moe_rec.baselines.text_neighbours import evaluate_text_neighbours

        name = "text"
        metrics = evaluate_text_neighbours(
            cfg.data_dir, cfg.sid, cfg.embedding_cache, split, exclude_seen, cold=cold
        )
    else:
        from moe_rec.eval.evaluate import evaluate_model

        split_dir = cfg.sequences_dir / cfg.eval.split
        if not any(split_dir.glob("*.parquet")):
            raise DataError(
                f"no {cfg.eval.split} samples in {split_dir}; run `moe-rec sequences build` first"
            )
        samples = datasets.Dataset.from_parquet(str(split_dir / "*.parquet"))
        name, model, table = _load_eval_model(cfg, checkpoint, bundle)
        metrics = evaluate_model(model, table, samples, cfg.eval, cold, predictions=predictions)
        if predictions is not None:
            console.print(f"wrote every request's ranking to {predictions}")
        if not bundle:
            _log_checkpoint_result(cfg, name, metrics)
    report = {"model": name, "config": to_dict(cfg.eval), "metrics": metrics}
    _write_report(cfg.eval_dir / f"{cfg.eval.split}-{name}.json", report)
    return report


def _write_report(path: Path, report: dict[str, Any]) -> None:
    """An evaluation report as JSON at ``path`` (its directory made), said on the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {path}")


def _load_eval_model(cfg: ExperimentConfig, checkpoint: str, bundle: str | None) -> tuple[str, Any, Any]:
    """``(name, model, SID table)`` of a checkpoint of the run or of a bundle (checksums verified)."""
    if bundle:
        from moe_rec.export import load_bundle

        loaded = load_bundle(bundle)
        return (
            f"bundle-{loaded.manifest['source']['tag']}-{loaded.manifest['dtype']}",
            loaded.model,
            loaded.table,
        )
    from moe_rec.sid.table import SIDTable
    from moe_rec.train.checkpoint import load_model, resolve_tag

    name = resolve_tag(cfg.checkpoint_dir, checkpoint)
    return name, load_model(cfg.checkpoint_dir, name), SIDTable.load(cfg.sid_dir)


def stage_eval_critiques(
    cfg: ExperimentConfig, *, checkpoint: str = "best", bundle: str | None = None
) -> dict:
    """The critique requests of ``cfg.eval.split`` ranked with and without their critique, beside
    the rule filter (:mod:`moe_rec.eval.critiques`); writes and returns the report
    (``<run_dir>/eval/critiques-<split>-<model>-filter<eval.filter_depth>[-plain<weight>].json``: the
    filter's depth changes only its column, so runs at two depths keep both files)."""
    from moe_rec.data import store
    from moe_rec.data.critiques import load_rows
    from moe_rec.data.text_samples import CRITIQUE_SPLITS
    from moe_rec.eval.critiques import evaluate_critiques, item_facts, with_named_terms

    split_dir = cfg.sequences_dir / CRITIQUE_SPLITS[cfg.eval.split]
    if not any(split_dir.glob("*.parquet")):
        raise DataError(
            f"no critique requests in {split_dir}; build the sequences with critiques.enabled (`moe-rec run`)"
        )
    name, model, table = _load_eval_model(cfg, checkpoint, bundle)
    if getattr(model.config, "text_token_range", None) is None:
        raise ConfigError(f"{name} reads no text (trained without critiques); train with critiques.enabled")
    requests, missing = with_named_terms(
        datasets.Dataset.from_parquet(str(split_dir / "*.parquet")).to_list(),
        load_rows(cfg.critiques_dir, cfg.eval.split)
        .select_columns(["user", "service", "prev_item", "target_item", "terms"])
        .to_list(),
    )
    if missing:
        console.print(
            f"[yellow]{missing:,} of {len(requests):,} requests have no record in {cfg.critiques_dir}: "
            "the filter reads no terms for them[/]"
        )
    facts = item_facts(store.load_table(cfg.data_dir, store.ITEMS_DIR), table, cfg.critiques)
    depth, weight = cfg.eval.filter_depth, cfg.eval.critique_plain_weight
    if weight is None:  # the model's own
        weight = getattr(model.config, "critique_plain_weight", 0.0)
    metrics = evaluate_critiques(
        model,
        table,
        requests,
        facts,
        batch_size=cfg.eval.batch_size,
        exclude_seen=cfg.eval.exclude_seen,
        depth=depth,
        plain_weight=weight,
    )
    report = {
        "model": name,
        "split": CRITIQUE_SPLITS[cfg.eval.split],
        "filter_depth": depth,
        "critique_plain_weight": weight,
        "requests_without_record": missing,
        "metrics": metrics,
    }
    mixed = f"-plain{weight:g}" if weight else ""
    _write_report(cfg.eval_dir / f"critiques-{cfg.eval.split}-{name}-filter{depth}{mixed}.json", report)
    return report


NARRATIVE_REQUESTS = 300  # test requests whose top item is explained (eval.max_samples, when set, instead)
NARRATIVE_REFERENCES = 300  # requests with a held-out-family reference narrative, for BLEU / ROUGE-L


def stage_eval_narratives(
    cfg: ExperimentConfig,
    *,
    checkpoint: str = "best",
    bundle: str | None = None,
    references: int = NARRATIVE_REFERENCES,
) -> dict:
    """Narratives for the top item of the first test requests, scored for consistency with that
    item, diversity (distinct-n, self-BLEU), faithfulness, personalisation and format validity;
    then the targets of the first ``references`` requests with a held-out-family reference
    narrative, narrated and scored with BLEU-4 / ROUGE-L beside the calibration baselines
    (:mod:`moe_rec.eval.narrative_metrics`, :mod:`moe_rec.eval.narrative_references`); writes and
    returns the report (``<run_dir>/eval/narratives-<split>-<model>.json``, with a few examples)."""

    import torch

    from moe_rec.data import store
    from moe_rec.data.sequences import user_bucket
    from moe_rec.data.text_tokenizer import TextTokenizer
    from moe_rec.eval.critiques import item_facts
    from moe_rec.eval.exact import (
        ServiceCatalogue,
        gathered_item_table,
        rank_exact,
        request_history_rows,
        request_vocabulary,
    )
    from moe_rec.eval.narrate import MAX_NARRATIVE_TOKENS, merge_repeats, narrative_prompt, write_narratives
    from moe_rec.eval.narrative_eval import item_titles, request_personalisation, score_references
    from moe_rec.eval.narrative_metrics import (
        consistency,
        diversity,
        faithfulness,
        format_validity,
        history_facts,
        narrative_facts,
        self_bleu,
        words,
    )
    from moe_rec.sid.build import table_text_embeddings
    from moe_rec.sid.embed import TextEncoder

    name, model, table = _load_eval_model(cfg, checkpoint, bundle)
    if getattr(model.config, "text_token_range", None) is None:
        raise ConfigError(f"{name} writes no text (trained without critiques); train with critiques.enabled")
    tokenizer = TextTokenizer.load(Path(bundle) if bundle else cfg.sequences_dir)
    split_dir = cfg.sequences_dir / cfg.eval.split
    requests = datasets.Dataset.from_parquet(str(split_dir / "*.parquet"))
    rows = requests.select(range(min(len(requests), cfg.eval.max_samples or NARRATIVE_REQUESTS))).to_list()
    vocab, catalogue = (
        request_vocabulary(model, table),
        ServiceCatalogue(table, next(model.parameters()).device),
    )
    vectors = gathered_item_table(model)
    top = torch.cat([
        rank_exact(model, catalogue, rows[i : i + cfg.eval.batch_size], 1, cfg.eval.exclude_seen, vectors)
        for i in range(0, len(rows), cfg.eval.batch_size)
    ])[:, 0].tolist()  # fmt: skip
    prompts = [
        narrative_prompt(r, vocab.item_tokens(r["service"], table.codes[item].tolist()), vocab)
        for r, item in zip(rows, top, strict=True)
    ]
    users = [user_bucket(r["user"], model.config.num_user_buckets) for r in rows]
    subwords = write_narratives(model, prompts, users, vocab)  # KV-cached greedy
    written = [tokenizer.decode(ids) for ids in subwords]
    texts = [merge_repeats(t) for t in written]  # as shown (narrative_text)
    items = store.load_table(cfg.data_dir, store.ITEMS_DIR)
    item_vectors = table_text_embeddings(
        items, table, cfg.sid, cfg.embedding_cache, None if bundle else cfg.sid_dir
    )
    encoder = TextEncoder.from_config(cfg.sid.encoder, cfg.embedding_cache)
    service_rows = {s: (table.service_index == i).nonzero().flatten() for i, s in enumerate(table.services)}
    candidates = [service_rows[r["service"]] for r in rows]  # each narrative ranks its service's items
    narrative_vectors = encoder.encode(texts)
    metrics = consistency(narrative_vectors, item_vectors, top, candidates) | diversity(texts)
    metrics["self_bleu"] = self_bleu([words(t) for t in texts])
    # calibration: the item's own title as its "narrative" (the ceiling of what a text can say)
    title = item_titles(items)
    titles = [title[(r["service"], str(table.item_ids[item]))] for r, item in zip(rows, top, strict=True)]
    title_vectors = encoder.encode(titles)
    metrics["title_mrr"] = consistency(title_vectors, item_vectors, top, candidates)["mrr"]
    facts = item_facts(items, table, cfg.critiques)
    own, values = narrative_facts(facts, [r["service"] for r in rows], service_rows, top)
    held = history_facts(facts, [request_history_rows(r, vocab, table) for r in rows])
    metrics |= {f"faithful_{k}": v for k, v in faithfulness(texts, own, values, held).items()}
    metrics |= request_personalisation(rows, vocab, table, item_vectors, narrative_vectors, title_vectors)
    item_ids = {str(i).lower() for i in items.column("item_id").to_pylist()}
    lengths = [len(ids) for ids in subwords]
    validity = format_validity(lengths, texts, MAX_NARRATIVE_TOKENS, item_ids)
    metrics |= {f"format_{k}": v for k, v in validity.items()}
    metrics["format_repeated_list"] = sum(w != t for w, t in zip(written, texts, strict=True)) / len(texts)
    sizes = [len(c) for c in candidates]
    metrics["chance_mrr"] = sum(sum(1 / r for r in range(1, n + 1)) / n for n in sizes) / len(sizes)
    metrics["requests"] = len(rows)
    examples = [{"user": r["user"], "service": r["service"], "item": str(table.item_ids[item]), "narrative": t}
                for r, item, t in list(zip(rows, top, texts, strict=True))[:5]]  # fmt: skip
    scored = score_references(
        cfg.narratives_dir,
        cfg.eval.split,
        requests,
        references,
        model,
        table,
        vocab,
        tokenizer,
        item_vectors,
        title,
    )
    report = {"model": name, "split": cfg.eval.split, "metrics": metrics, "references": scored,
              "examples": examples}  # fmt: skip
    _write_report(cfg.eval_dir / f"narratives-{cfg.eval.split}-{name}.json", report)
    return report


def _print_narrative_metrics(report: dict) -> None:
    """The narrative report: consistency, diversity, faithfulness; personalisation and format; BLEU /
    ROUGE-L against held-out-family references beside the baselines; then the examples."""
    m = report["metrics"]
    table = Table(
        title=f"narratives of the top item, {report['split']} ({report['model']}, {m['requests']:,.0f} requests)"
    )
    keys = ("mrr", "chance_mrr", "title_mrr", "hit@10", "distinct-1", "distinct-2", "repeated",
            "faithful_precision", "faithful_coverage", "faithful_grounded")  # fmt: skip
    for col in ("MRR of the item", "chance", "its title", "Hit@10", "distinct-1", "distinct-2", "repeated",
                "named right", "item's named", "item's or history's"):  # fmt: skip
        table.add_column(col, justify="right")
    table.add_row(*(f"{m[k]:.4f}" for k in keys))
    results.print(table)
    table = Table(title="self-BLEU; personalisation (AUC against other users' histories, same service; "
                  "0.5: none); format")  # fmt: skip
    keys = ("self_bleu", "personal_auc", "title_personal_auc", "personal_requests", "format_valid",
            "format_ended", "format_nonempty", "format_clean", "format_repeated_list")  # fmt: skip
    for col in ("self-BLEU", "narrative AUC", "its title's AUC", "requests", "valid", "ended [EOS]",
                "non-empty", "clean", "a list item twice"):  # fmt: skip
        table.add_column(col, justify="right")
    table.add_row(*(f"{m[k]:,}" if k == "personal_requests" else f"{m[k]:.4f}" for k in keys))
    results.print(table)
    refs = report.get("references", {})
    if refs.get("requests"):
        table = Table(
            title=f"the target narrated, against held-out-family references ({refs['requests']:,} requests)"
        )
        for col in ("text", "BLEU-4", "ROUGE-L F1", "brevity penalty", "length ratio"):
            table.add_column(col, justify="left" if col == "text" else "right")
        names = {"model": "the model's narrative", "title": "the target's title",
                 "nearest_item": "nearest training narrative (item)",
                 "user_last": "the user's last training narrative"}  # fmt: skip
        for key, label in names.items():
            r = refs[key]
            table.add_row(label, *(f"{r[k]:.4f}" for k in ("bleu", "rouge_l", "bp", "ratio")))
        results.print(table)
    for e in report["examples"]:
        results.print(f"{e['service']}:{e['item']}: {e['narrative']}")


def _print_critique_metrics(report: dict) -> None:
    """The critique report as a table: N@10 and R@10 with the critique, without it and the rule
    filter, per scope."""
    metrics = report["metrics"]
    table = Table(title=f"{report['split']} ({report['model']}): with the critique, without it, rule filter")
    for col in ("scope", "requests", "N@10 critique", "N@10 plain", "N@10 filter", "R@10 critique",
                "R@10 plain", "R@10 filter", "top-10 satisfied: critique / plain"):  # fmt: skip
        table.add_column(col, justify="left" if col == "scope" else "right")
    scopes = sorted({k.split("/")[0] for k in metrics if k.endswith("/count")}, key=lambda s: (s != "all", s))
    for scope in scopes:
        sat = [k for k in metrics if k.startswith(f"{scope}/critique/satisfied_")]
        shown = (
            f"{metrics[sat[0]]:.2f} / {metrics[sat[0].replace('/critique/', '/plain/')]:.2f}" if sat else "-"
        )
        table.add_row(scope, f"{metrics[f'{scope}/count']:,.0f}",
                      *(f"{metrics[f'{scope}/{m}/{k}']:.4f}" for k in ("ndcg@10", "recall@10")
                        for m in ("critique", "plain", "filter")), shown)  # fmt: skip
    results.print(table)


def stage_audit(
    cfg: ExperimentConfig,
    *,
    checkpoint: str = "best",
    bundle: str | None = None,
    seed: int = 0,
    rounds: int = 1000,
    max_users: int = 0,
) -> dict[str, Any]:
    """Membership inference and canary exposure of a checkpoint (or bundle) of the run
    (:mod:`moe_rec.eval.privacy_audit`); writes and returns ``<run_dir>/eval/audit-<model>.json``,
    with the model's NDCG@10 from its evaluation report when there is one."""
    from moe_rec.eval.privacy_audit import run_audit

    name, model, table = _load_eval_model(cfg, checkpoint, bundle)
    t0 = time.perf_counter()
    found = run_audit(model, table, cfg.sequences_dir, seed=seed, rounds=rounds, max_users=max_users)
    report: dict[str, Any] = {"model": name, "seed": seed, "bootstrap_rounds": rounds, **found}
    for split in ("test", "valid"):  # the model's utility beside its leakage, when it was evaluated
        path = cfg.eval_dir / f"{split}-{name}.json"
        if path.exists():
            metrics = json.loads(path.read_text())["metrics"]
            report["utility"] = {"split": split, "ndcg@10": metrics.get(f"{split}/ndcg@10"),
                                 "recall@10": metrics.get(f"{split}/recall@10")}  # fmt: skip
            break
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _write_report(cfg.eval_dir / f"audit-{name}.json", report)
    return report


def _print_audit(report: dict[str, Any]) -> None:
    if m := report.get("membership"):
        table = Table(title=f"membership inference ({report['model']}): {m['members']:,} members vs "
                      f"{m['non_members']:,} held-out users")  # fmt: skip
        for col in ("attack", "AUC", "95% interval", "members' mean", "held-out mean"):
            table.add_column(col, justify="left" if col == "attack" else "right")
        for attack, what in (("loss", "loss (item softmax)"), ("rank", "log2 rank")):
            a = m[attack]
            table.add_row(what, f"{a['auc']:.3f}", f"{a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}",
                          f"{a['members_mean']:.3f}", f"{a['non_members_mean']:.3f}")  # fmt: skip
        results.print(table)
    if c := report.get("canaries"):
        table = Table(title=f"canary exposure ({report['model']}), bits: log2(N) - log2(rank)")
        for col in ("canaries", "count", "mean exposure", "median", "log2(N)", "ranks"):
            table.add_column(col, justify="left" if col in ("canaries", "ranks") else "right")
        for kind in ("planted", "controls"):
            e = c[kind]
            if e["count"]:
                table.add_row(kind, str(e["count"]), f"{e['exposure_mean']:.2f}", f"{e['exposure_median']:.2f}",
                              f"{e['exposure_max']:.2f}", " ".join(map(str, e["ranks"][:12])))  # fmt: skip
        results.print(table)
    if u := report.get("utility"):
        results.print(f"{u['split']} NDCG@10 of this model: {u['ndcg@10']:.4f}")


def _log_checkpoint_result(cfg: ExperimentConfig, tag: str, metrics: dict[str, float]) -> None:
    """A checkpoint's evaluation into the run's ``metrics.jsonl`` (kind: the split) and the summary
    of its W&B run, resumed by the id training saved (none saved: no W&B)."""
    from moe_rec.train.checkpoint import step_of
    from moe_rec.train.metrics import RankZeroLogger

    w = cfg.train.wandb
    path = cfg.checkpoint_dir / "metrics.jsonl"
    logger = RankZeroLogger(
        rank=0, run_dir=cfg.run_dir, metrics_path=path, project=w.project, mode=w.mode,
        name=w.name or cfg.run_dir.name, new_run=False,
    )  # fmt: skip
    try:
        logger.log_result(metrics, step_of(tag), kind=cfg.eval.split, checkpoint=tag)
    finally:
        logger.finish()
    console.print(f"added to {path}; W&B: {logger.location()}")


def stage_export(
    cfg: ExperimentConfig | None, ckpt_dir: Path, out: Path, *, tag: str, dtype: str, overwrite: bool
) -> dict[str, Any]:
    """A checkpoint -> a verified serving bundle at ``out``; returns its manifest."""
    from moe_rec.export import export_checkpoint

    run_dir = cfg.run_dir if cfg else ckpt_dir.parent
    console.print(f"exporting {ckpt_dir} ({tag}, {dtype}) to {out}")
    export_checkpoint(
        ckpt_dir, out, tag=tag, dtype=dtype, run_dir=run_dir, config=to_dict(cfg) if cfg else None,
        overwrite=overwrite,
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    v = manifest["verification"]
    size = sum(f["size"] for f in manifest["files"].values())
    console.print(
        f"wrote {out}: {manifest['source']['tag']}, {manifest['items']['total']:,} items, {size / 2**20:.1f} MiB "
        f"in {v['export_seconds']:.1f}s; logits vs the fp32 checkpoint on {v['probes']} prompts: max |diff| "
        f"{v['max_abs_diff']:.3g} (bound {v['tolerance']['max_abs_diff']:.3g}), mean {v['mean_abs_diff']:.3g}, "
        f"argmax agreement {v['argmax_agreement']:.3f}"
    )
    if (dp := manifest.get("privacy")) is not None:
        console.print(
            f"privacy: ({dp['epsilon']:.3g}, {dp['delta']:.3g})-DP per {dp['unit']} after {dp['steps']:,} steps "
            f"({dp['accountant']}, {dp['library']}; noise sigma {dp['noise_multiplier']:.4g}, clip {dp['max_grad_norm']:g})"
        )
    return manifest


def recommendations(
    rec: Recommender,
    history: Sequence[tuple[str, str]],
    service: str,
    k: int,
    user: str | None,
    exclude_seen: bool,
    critique: str | None = None,
    explain: bool = False,
) -> dict[str, Any]:
    """One request through the serving API, as the JSON document ``moe-rec recommend --json``
    prints: the request, ``available`` (items it may get) and ``items`` best first (with their
    narratives when ``explain``)."""
    found = rec.recommend(
        history, service, k=k, exclude_seen=exclude_seen, user_id=user, critique=critique, explain=explain
    )
    return {
        "service": service, "k": k, "user": user, "exclude_seen": exclude_seen, "critique": critique,
        "history": [f"{s}:{i}" for s, i in history],
        "available": rec.available(history, service, exclude_seen),
        "items": [
            {"rank": rank, "item_id": r.item_id, "score": r.score, "fields": r.fields}
            | ({"narrative": r.narrative} if r.narrative is not None else {})
            for rank, r in enumerate(found, start=1)
        ],
    }  # fmt: skip


# -- how results are shown ---------------------------------------------------------------------


def _print_metrics(report: dict[str, Any], split: str) -> None:
    from moe_rec.eval.metrics import metrics_table

    title = f"{split} ({report['model']}, full ranking, leave-one-out)"
    results.print(metrics_table(report["metrics"], title=title))


def _versus_popularity(model: dict[str, float], popular: dict[str, float], split: str) -> Table:
    """The trained model beside the most-popular baseline: Recall@10 / NDCG@10 per service and all."""
    table = Table(title=f"{split}: the model beside the most popular items (full ranking)")
    for col in ("service", "model R@10", "popular R@10", "model N@10", "popular N@10"):
        table.add_column(col, justify="left" if col == "service" else "right")
    scopes = sorted({k.split("/")[1] for k in model if k.count("/") == 2 and "/macro/" not in k})
    for scope, prefix in [*((s, f"{split}/{s}/") for s in scopes), ("all", f"{split}/")]:
        table.add_row(scope, *(f"{d.get(prefix + m, float('nan')):.4f}" for m in ("recall@10", "ndcg@10")
                                for d in (model, popular)))  # fmt: skip
    return table


def _print_recommendations(found: dict[str, Any], held_out: str | None = None) -> None:
    """:func:`recommendations` as a table (the held-out item, if given, marked)."""
    history, service, k = found["history"], found["service"], found["k"]
    shown = ", ".join(history[-5:])
    title = f"{found['user'] or 'request'}: {len(history)} events (last: {shown}) -> top {k} in {service}"
    table = Table(title=title, title_justify="left")
    for col in ("rank", "item", "score", "title"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for r in found["items"]:
        mark = " [bold green](held out)[/]" if r["item_id"] == held_out else ""
        name = str(r["fields"].get("title") or "")[:60]
        table.add_row(str(r["rank"]), r["item_id"] + mark, f"{r['score']:.3f}", name)
    results.print(table)
    for r in found["items"]:  # explain: each item's narrative under the table
        if "narrative" in r:
            results.print(f"{r['rank']}. {r['item_id']}: {r['narrative']}")
    if len(found["items"]) < k:  # the Recommender returns fewer than k only when no more exist
        why = " (the history has the others)" if found["exclude_seen"] else ""
        results.print(f"only {len(found['items'])} items of {service} are left to recommend{why}: all shown")
    if held_out is not None and all(r["item_id"] != held_out for r in found["items"]):
        results.print(f"held-out item {service}:{held_out} is not in the top {k}")


def _recommend_for_test_users(cfg: ExperimentConfig, bundle: Path, users: int = 3, k: int = 5) -> None:
    """The end of ``moe-rec run``: the bundle recommends for the first few test users (their train
    and valid events, in training's cross-service order, as the history) in the service of their
    first held-out test item, excluding seen items as the evaluation did (``eval.exclude_seen``);
    with critiques, again with the user's test critique, each item explained."""
    import pyarrow.compute as pc

    from moe_rec.data import store
    from moe_rec.data.critiques import load_rows
    from moe_rec.data.sequences import iter_users, unified_order
    from moe_rec.serve import Recommender

    events = store.load_table(cfg.data_dir)
    first = pc.unique(events["user"])[:users]
    mine = events.filter(pc.is_in(events["user"], first)).sort_by([("user", "ascending")])
    critiques = {}  # (user, service, target) -> the test critique
    if cfg.critiques.enabled:
        for row in load_rows(cfg.critiques_dir, "test").select_columns(
            ["user", "service", "target_item", "text"]
        ):
            critiques[(row["user"], row["service"], row["target_item"])] = row["text"]
    with Recommender.from_bundle(bundle) as rec:
        for user, user_events in iter_users(mine):
            ordered = unified_order(user_events, rec.services)
            target = next((e for e in ordered if e.split == "test"), None)
            if target is None:
                continue
            history = [(e.service, e.item_id) for e in ordered if e.split != "test"]
            found = recommendations(rec, history, target.service, k, user, cfg.eval.exclude_seen)
            _print_recommendations(found, held_out=target.item_id)
            critique = critiques.get((user, target.service, target.item_id))
            if critique is not None and rec.bundle.tokenizer is not None:
                results.print(f"the same with the user's critique: {critique!r}, explained")
                found = recommendations(
                    rec, history, target.service, k, user, cfg.eval.exclude_seen, critique, explain=True
                )
                _print_recommendations(found, held_out=target.item_id)


# -- the commands: arguments in, results out ----------------------------------------------------


def cmd_data_prepare(args: argparse.Namespace) -> None:
    cfg = _load(args)
    stage_prepare(cfg, Path(args.out) if args.out else cfg.data_dir)


def cmd_data_stats(args: argparse.Namespace) -> None:
    from moe_rec.data.store import read_stats

    if args.data_dir is None and args.config is None:
        raise ConfigError("give a prepared data directory or --config")
    data_dir = Path(args.data_dir) if args.data_dir else _load(args).data_dir
    stats = read_stats(data_dir)
    if args.json:
        print_json(stats)
    else:
        _print_data_stats(stats, results)


def cmd_critiques_build(args: argparse.Namespace) -> None:
    stage_critiques(_load(args))


def cmd_critiques_stats(args: argparse.Namespace) -> None:
    from moe_rec.data.critiques import read_stats

    if args.critiques_dir is None and args.config is None:
        raise ConfigError("give a critiques directory (<run_dir>/critiques) or --config")
    out = Path(args.critiques_dir) if args.critiques_dir else _load(args).critiques_dir
    stats = read_stats(out)
    if args.json:
        print_json(stats)
    else:
        _print_critique_stats(stats, results)


def cmd_data_forget(args: argparse.Namespace) -> None:
    from moe_rec.data.forget import read_users_file

    cfg = _load(args) if args.config or args.overrides else None
    if args.data is None and cfg is None:
        raise ConfigError("give --data <prepared data directory> or --config")
    if args.rebuild_sequences and cfg is None:
        raise ConfigError("--rebuild-sequences needs --config (the sequences' settings and SID table)")
    data_dir = Path(args.data) if args.data else cfg.data_dir
    users = list(args.user or []) + [u for f in args.users_file or [] for u in read_users_file(f)]
    report = stage_forget(data_dir, users, cfg=cfg, rebuild=args.rebuild_sequences)
    if args.json:
        print_json(report)
    else:
        _print_forget(report, data_dir, cfg)


def cmd_sids_build(args: argparse.Namespace) -> None:
    cfg = _load(args)
    stage_sids(
        cfg, Path(args.data) if args.data else cfg.data_dir, Path(args.out) if args.out else cfg.sid_dir
    )


def cmd_sequences_build(args: argparse.Namespace) -> None:
    stage_sequences(_load(args))


def cmd_train(args: argparse.Namespace) -> None:
    """One process: a one-rank DeepSpeed run (several ranks: the launch/ scripts)."""
    from moe_rec.train import train

    train(_load(args))


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _load(args)
    predictions = Path(args.save_predictions) if args.save_predictions else None
    if args.narratives:
        if args.baseline or predictions is not None or args.critiques:
            raise ConfigError(
                "--narratives evaluates a model's narratives: no --baseline, --critiques or --save-predictions"
            )
        report = stage_eval_narratives(
            cfg, checkpoint=args.checkpoint, bundle=args.bundle, references=args.narrative_references
        )
        print_json(report) if args.json else _print_narrative_metrics(report)
        return
    if args.critiques:
        if args.baseline or predictions is not None:
            raise ConfigError(
                "--critiques evaluates a model's critique requests: no --baseline or --save-predictions"
            )
        report = stage_eval_critiques(cfg, checkpoint=args.checkpoint, bundle=args.bundle)
        print_json(report) if args.json else _print_critique_metrics(report)
        return
    report = stage_eval(
        cfg, checkpoint=args.checkpoint, bundle=args.bundle, baseline=args.baseline, predictions=predictions
    )
    if args.json:
        print_json(report)
    else:
        _print_metrics(report, cfg.eval.split)


def cmd_audit(args: argparse.Namespace) -> None:
    report = stage_audit(
        _load(args), checkpoint=args.checkpoint, bundle=args.bundle, seed=args.seed, rounds=args.rounds,
        max_users=args.max_users,
    )  # fmt: skip
    if args.json:
        print_json(report)
    else:
        _print_audit(report)


def cmd_export(args: argparse.Namespace) -> None:
    cfg = _load(args) if args.config or args.overrides else None
    if cfg is None and args.checkpoint is None:
        raise ConfigError("give --checkpoint <run_dir>/checkpoints or --config")
    ckpt_dir = Path(args.checkpoint) if args.checkpoint else cfg.checkpoint_dir
    out = Path(args.out) if args.out else (cfg.run_dir if cfg else ckpt_dir.parent) / "bundle"
    stage_export(cfg, ckpt_dir, out, tag=args.tag, dtype=args.dtype, overwrite=args.overwrite)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a bundle over HTTP in this process until Ctrl-C / SIGTERM (then shut down gracefully)."""
    from moe_rec.serve.http import run_server

    config = ServeConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_k=args.max_k,
        max_body_bytes=args.max_body_bytes,
        torch_threads=args.torch_threads,
        access_log=args.access_log,
        log_level=args.log_level,
    )
    run_server(args.bundle, config)


def cmd_recommend(args: argparse.Namespace) -> None:
    """Recommendations from a bundle for one history given on the command line."""
    from moe_rec.serve import Recommender

    with Recommender.from_bundle(args.bundle, ServeConfig(device=args.device)) as rec:
        found = recommendations(
            rec, args.history, args.service, args.k, args.user, args.exclude_seen, args.critique, args.explain
        )
    if args.json:
        print_json(found)
    else:
        _print_recommendations(found)


def cmd_run(args: argparse.Namespace) -> None:
    """The main job: data -> (critiques and narratives, with ``critiques.enabled``) -> semantic
    IDs -> sequences -> train -> evaluate the best checkpoint beside the most-popular baseline (and
    audit it, with held-out users or canaries) -> export it as a serving bundle -> recommend from
    the bundle for a few test users."""
    from moe_rec.train import train

    t0 = time.perf_counter()
    cfg = _load(args)
    critiques = [("critiques build", cfg.critiques_dir, lambda: stages.critiques_print(cfg),
                  lambda: stage_critiques(cfg))] if cfg.critiques.enabled else []  # fmt: skip
    for title, out, current, make in (
        ("data prepare", cfg.data_dir, lambda: stages.data_print(cfg), lambda: stage_prepare(cfg, cfg.data_dir)),
        *critiques,
        ("sids build", cfg.sid_dir, lambda: stages.sids_print(cfg, cfg.data_dir),
         lambda: stage_sids(cfg, cfg.data_dir, cfg.sid_dir)),
        ("sequences build", cfg.sequences_dir, lambda: stages.sequences_print(cfg), lambda: stage_sequences(cfg)),
    ):  # fmt: skip
        console.rule(f"[bold]{title}")
        if stages.read(out) == current():  # a stage's fingerprint needs the stamps of the ones before it
            console.print(f"{out}: made by the same config and inputs; skipped ({out / stages.STAMP_FILE})")
            continue
        make()
    console.rule("[bold]train")
    train(cfg)
    console.rule("[bold]eval")
    model = stage_eval(cfg, checkpoint="best")
    _print_metrics(model, cfg.eval.split)
    popular = stage_eval(cfg, baseline="popularity")
    _print_metrics(popular, cfg.eval.split)
    results.print(_versus_popularity(model["metrics"], popular["metrics"], cfg.eval.split))
    if cfg.model.kind == "item" and (cfg.sequences.holdout_users or cfg.sequences.canaries.count):
        console.rule("[bold]audit")
        _print_audit(stage_audit(cfg, checkpoint="best"))
    console.rule("[bold]export")
    stage_export(cfg, cfg.checkpoint_dir, cfg.run_dir / "bundle", tag="best", dtype="float32", overwrite=True)
    console.rule("[bold]recommend")
    _recommend_for_test_users(cfg, cfg.run_dir / "bundle")
    console.rule(f"done in {time.perf_counter() - t0:.0f}s; run directory: {cfg.run_dir}")


# -- the command line -----------------------------------------------------------------------------


def _parse_event(text: str) -> tuple[str, str]:
    service, sep, item_id = text.partition(":")
    if not sep or not service or not item_id:
        raise argparse.ArgumentTypeError(f"{text!r}: write an event as SERVICE:ITEM_ID")
    return service, item_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-rec", description=plain(__doc__.split("\n\n")[0]))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="experiment YAML (e.g. configs/experiments/demo.yaml)")
        p.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.strict=true"
        )
        return p

    run = with_config(
        groups.add_parser(
            "run", help="the whole pipeline: data, SIDs, sequences, train, eval, export, recommend"
        )
    )
    run.set_defaults(func=cmd_run)

    data = groups.add_parser("data", help="prepare and inspect event data").add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    prep = with_config(
        data.add_parser("prepare", help="read, validate and split a source; write Parquet shards")
    )
    prep.add_argument("--out", help="output directory (default: <run_dir>/data)")
    prep.set_defaults(func=cmd_data_prepare)
    stats = data.add_parser("stats", help="print the stats of a prepared data directory")
    stats.add_argument("data_dir", nargs="?", help="prepared data directory (or use --config)")
    stats.add_argument("--config", "-c", help="experiment YAML whose run_dir/data to read")
    stats.add_argument("--json", action="store_true", help="print stats.json as is")
    stats.set_defaults(func=cmd_data_stats, overrides=[])
    forget = data.add_parser(
        "forget",
        help="delete users' events from a prepared directory (logged, idempotent; see docs/privacy.md)",
    )
    with_config(forget)
    forget.add_argument("--data", help="prepared data directory (default: <run_dir>/data of --config)")
    forget.add_argument("--user", action="append", metavar="ID", help="a user id to delete (repeatable)")
    forget.add_argument(
        "--users-file", action="append", metavar="FILE", help="user ids, one a line (repeatable)"
    )
    forget.add_argument("--rebuild-sequences", action="store_true",
                        help="rebuild the run's token samples at once (needs --config); default: remove them")  # fmt: skip
    forget.add_argument("--json", action="store_true", help="print the counts as one JSON document")
    forget.set_defaults(func=cmd_data_forget)

    crit = groups.add_parser("critiques", help="critiques and narratives from item metadata").add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    with_config(
        crit.add_parser("build", help="write <run_dir>/critiques and <run_dir>/narratives (train/valid/test)")
    ).set_defaults(func=cmd_critiques_build)
    crit_stats = crit.add_parser("stats", help="print the stats of a critiques directory (counts, leakage)")
    crit_stats.add_argument("critiques_dir", nargs="?", help="<run_dir>/critiques (or use --config)")
    crit_stats.add_argument("--config", "-c", help="experiment YAML whose run_dir/critiques to read")
    crit_stats.add_argument("--json", action="store_true", help="print stats.json as is")
    crit_stats.set_defaults(func=cmd_critiques_stats, overrides=[])

    sids = groups.add_parser("sids", help="semantic IDs").add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    build = with_config(
        sids.add_parser("build", help="embed item text, quantise, write the SID table and trie")
    )
    build.add_argument("--data", help="prepared data directory (default: <run_dir>/data)")
    build.add_argument("--out", help="output directory (default: <run_dir>/sids)")
    build.set_defaults(func=cmd_sids_build)

    seq = groups.add_parser("sequences", help="token samples for training and evaluation").add_subparsers(
        dest="command", required=True, metavar="COMMAND"
    )
    with_config(seq.add_parser("build", help="write train/valid/test token samples")).set_defaults(
        func=cmd_sequences_build
    )
    train = with_config(
        groups.add_parser("train", help="train on a run's sequences (DeepSpeed, one process)")
    )
    train.set_defaults(func=cmd_train)
    evaluate = with_config(
        groups.add_parser(
            "eval", help="Recall/NDCG@K: exact scoring (item-level model) or constrained beam search"
        )
    )
    evaluate.add_argument("--checkpoint", default="best", help="best (default), latest, or a step_* tag")
    evaluate.add_argument("--bundle", help="evaluate an exported bundle instead of a checkpoint")
    evaluate.add_argument(
        "--baseline",
        choices=["popularity", "sasrec", "text"],
        help="evaluate a baseline instead of a checkpoint (text: the last item's nearest text neighbours)",
    )
    evaluate.add_argument(
        "--save-predictions", metavar="PATH",
        help="also write every request's ranked item ids there (JSONL: request index, user, service, "
        "target, ranked), from which the metrics can be recomputed",
    )  # fmt: skip
    evaluate.add_argument(
        "--critiques", action="store_true",
        help="rank the split's critique requests with and without their critique, beside the rule filter",
    )  # fmt: skip
    evaluate.add_argument(
        "--narratives", action="store_true",
        help="explain the top item of the first test requests (consistency, diversity, faithfulness, "
        "personalisation, format) and narrate the targets of requests with a held-out-family reference "
        "narrative (BLEU-4, ROUGE-L beside baselines)",
    )  # fmt: skip
    evaluate.add_argument(
        "--narrative-references", type=int, default=NARRATIVE_REFERENCES, metavar="N",
        help=f"with --narratives: how many held-out-family requests to narrate (default {NARRATIVE_REFERENCES}; "
        "0: none)",
    )  # fmt: skip
    evaluate.add_argument("--json", action="store_true", help="print the report as one JSON document")
    evaluate.set_defaults(func=cmd_eval)
    audit = with_config(
        groups.add_parser(
            "audit", help="membership inference (held-out users) and canary exposure of a trained model"
        )
    )
    audit.add_argument("--checkpoint", default="best", help="best (default), latest, or a step_* tag")
    audit.add_argument("--bundle", help="audit an exported bundle instead of a checkpoint")
    audit.add_argument("--seed", type=int, default=0, help="member sample and bootstrap seed (default: 0)")
    audit.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    audit.add_argument("--max-users", type=int, default=0,
                       help="score at most this many held-out users (and as many members); 0: all")  # fmt: skip
    audit.add_argument("--json", action="store_true", help="print the report as one JSON document")
    audit.set_defaults(func=cmd_audit)
    export = with_config(
        groups.add_parser("export", help="checkpoint -> verified serving bundle (weights, SIDs, catalogue)")
    )
    export.add_argument("--checkpoint", help="checkpoint directory (default: <run_dir>/checkpoints)")
    export.add_argument("--out", help="bundle directory (default: <run_dir>/bundle)")
    export.add_argument("--tag", default="best", help="best (default), latest, or a step_* tag")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    export.set_defaults(func=cmd_export)
    rec = groups.add_parser("recommend", help="top-k items from a bundle for one history (SERVICE:ITEM_ID)")
    rec.add_argument("bundle", help="bundle directory (written by the export step)")
    rec.add_argument("--history", nargs="+", required=True, type=_parse_event, metavar="SERVICE:ITEM_ID",
                     help="the user's events across services, oldest first")  # fmt: skip
    rec.add_argument("--service", required=True, help="the service to recommend in")
    rec.add_argument("--k", type=int, default=DEFAULT_K, help="how many items (default: %(default)s)")
    rec.add_argument("--user", help="user id (hashed into the user-routing bucket, as in training)")
    rec.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                     help="leave out items already in the history (default: %(default)s)")  # fmt: skip
    rec.add_argument("--critique", help='what the user wants changed, in words ("something cheaper")')
    rec.add_argument("--explain", action="store_true", help="a narrative for every item: why it fits")
    rec.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    rec.add_argument("--json", action="store_true", help="print the recommendations as one JSON document")
    rec.set_defaults(func=cmd_recommend, overrides=[])
    serve = groups.add_parser(
        "serve",
        help="serve a bundle over HTTP: POST /v1/recommend, /healthz, /metrics, /docs",
        description="Serve an exported bundle over HTTP in one process. Concurrent requests are decoded "
        "together in batches of up to --max-batch-size; scale out by running more processes behind a "
        "load balancer. API docs at /docs, OpenAPI at /openapi.json, Prometheus metrics at /metrics.",
    )
    serve.add_argument("bundle", help="bundle directory (written by the export step)")
    serve.add_argument(
        "--host",
        default=ServeConfig.host,
        help="address to listen on; 0.0.0.0 for all (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=ServeConfig.port,
        help="TCP port, 1..65535; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)"
    )
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=ServeConfig.max_batch_size,
        help="most requests decoded in one batch (default: %(default)s)",
    )
    serve.add_argument(
        "--max-wait-ms", type=float, default=ServeConfig.max_wait_ms,
        help="how long the first request of a batch waits for more to arrive (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument(
        "--max-k", type=int, default=ServeConfig.max_k,
        help="largest k a request may ask for; also the beam width of every decode, so latency grows "
        "with it (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument(
        "--max-body-bytes", type=int, default=ServeConfig.max_body_bytes,
        help="larger request bodies are refused with 413 (default: %(default)s = 1 MiB)",
    )  # fmt: skip
    serve.add_argument(
        "--torch-threads", type=int,
        help="CPU threads of the model (default: torch's, one per core); 1 is often fastest on a small "
        "or shared machine, see docs/serving.md",
    )  # fmt: skip
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off by default; /metrics counts them)"
    )
    serve.add_argument(
        "--log-level",
        default=ServeConfig.log_level,
        choices=LOG_LEVELS,
        help="server log verbosity (default: %(default)s)",
    )
    serve.set_defaults(func=cmd_serve)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides also after a command's options
    (``moe-rec eval --config C --checkpoint best --critiques eval.filter_depth=200``), in order."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    datasets.disable_progress_bars()  # our own progress bars cover the long steps
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        args.func(args)
    except (MoeRecError, OSError) as e:
        # input a user can fix, or the machine refusing (a missing file, a port in use), in one line;
        # --debug shows where. Any other exception is a bug, and its traceback shows.
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, however long
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
