"""Which words of a critique move the ranking? A run's critique requests ranked as built and with
each critique rewritten by regular-expression substitutions, beside the rule filter.

`moe-rec eval --critiques` reports N@10 per wording family (``family:<name>``); when a held-out
family lags, this asks why: drop its opener, drop a carrier phrase, and rank the same requests
again with the same checkpoint. Each ``--sub 'PATTERN=>REPLACEMENT'`` is a Python regular
expression applied to every chosen critique in order; the rewritten text is encoded with the run's
tokenizer and put where the critique was. The requests as built are ranked too, and their
re-encoding is checked against the stored tokens (a critique cut at ``max_text_tokens`` is
counted, not compared).

    python tools/reword_critiques.py --config configs/experiments/amazon2014_critiques.yaml \\
        run_dir=runs/beauty-crit-c1 --family seen_it \\
        --sub "^(I have that one already|I've tried that one, it was okay|Already got that one)\\. ?=>"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import datasets
import torch

from moe_rec.config import ConfigError, load_config
from moe_rec.data import store
from moe_rec.data.critiques import load_rows
from moe_rec.data.schema import DataError
from moe_rec.data.text_samples import CRITIQUE_SPLITS, without_critique
from moe_rec.data.text_tokenizer import TextTokenizer
from moe_rec.data.vocab import CRITIQUE, Vocabulary
from moe_rec.eval.critiques import evaluate_critiques, item_facts, with_named_terms
from moe_rec.experiment import ExperimentConfig
from moe_rec.sid.table import SIDTable
from moe_rec.train.checkpoint import CheckpointError, load_model

TYPES = ("brand", "category", "price", "size", "terms", "pack", "colour")


def parse_sub(text: str) -> tuple[re.Pattern[str], str]:
    """``'PATTERN=>REPLACEMENT'`` -> (compiled pattern, replacement)."""
    pattern, sep, replacement = text.partition("=>")
    if not sep:
        raise SystemExit(f"error: --sub {text!r}: write PATTERN=>REPLACEMENT")
    try:
        return re.compile(pattern), replacement
    except re.error as e:
        raise SystemExit(f"error: --sub {text!r}: {e}") from None


def reworded(
    request: dict[str, Any], text: str, tokenizer: TextTokenizer, text_offset: int
) -> dict[str, Any]:
    """``request`` with its critique's words replaced by ``text``'s (the asked service kept last)."""
    ids, domains = without_critique(request["input_ids"], request["domain_ids"])
    words = [CRITIQUE, *(text_offset + i for i in tokenizer.encode(text))]
    return {
        **request,
        "critique": text,
        "input_ids": ids[:-1] + words + ids[-1:],
        "domain_ids": domains[:-1] + [domains[-1]] * len(words) + domains[-1:],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Print (and return, by variant) the critique metrics of the requests as built and rewritten."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument(
        "--family", action="append", default=[], help="wording families to rank (default: all)"
    )
    parser.add_argument("--sub", action="append", default=[], help="PATTERN=>REPLACEMENT, applied in order")
    args = parser.parse_args(argv)
    subs = [parse_sub(s) for s in args.sub]
    torch.set_num_threads(1)
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
        model = load_model(cfg.checkpoint_dir, args.checkpoint)
        table = SIDTable.load(cfg.sid_dir)
        tokenizer = TextTokenizer.load(cfg.sequences_dir)
        offset = Vocabulary.from_dict(json.loads((cfg.sequences_dir / "vocab.json").read_text())).text_offset
        split_dir = cfg.sequences_dir / CRITIQUE_SPLITS[cfg.eval.split]
        requests, _ = with_named_terms(
            datasets.Dataset.from_parquet(str(split_dir / "*.parquet")).to_list(),
            load_rows(cfg.critiques_dir, cfg.eval.split).to_list(),
        )
        facts = item_facts(store.load_table(cfg.data_dir, store.ITEMS_DIR), table, cfg.critiques)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    chosen = [r for r in requests if not args.family or r["family"] in args.family]
    if not chosen:
        known = sorted({r["family"] for r in requests})
        raise SystemExit(
            f"error: no {cfg.eval.split} critique request in families {args.family}; known: {known}"
        )
    as_built = [reworded(r, r["critique"], tokenizer, offset) for r in chosen]
    cut = sum(a["input_ids"] != r["input_ids"] for a, r in zip(as_built, chosen, strict=True))
    texts = []
    for r in chosen:
        text = r["critique"]
        for pattern, replacement in subs:
            text = pattern.sub(replacement, text)
        texts.append(text.strip())
    changed = sum(t != r["critique"] for t, r in zip(texts, chosen, strict=True))
    print(
        f"{len(chosen):,} requests; {changed:,} rewritten; {cut:,} critiques cut at max_text_tokens when built"
    )
    out: dict[str, dict[str, float]] = {}
    variants = {
        "as built": chosen,
        "rewritten": [reworded(r, t, tokenizer, offset) for r, t in zip(chosen, texts)],
    }
    for name, rows in variants.items():
        print(f"{name}: e.g. {rows[0]['critique']!r}")
        m = out[name] = evaluate_critiques(
            model, table, rows, facts, batch_size=cfg.eval.batch_size, depth=cfg.eval.filter_depth
        )
        print(
            f"  all ({len(rows):,}) N@10 critique {m['all/critique/ndcg@10']:.4f}  filter {m['all/filter/ndcg@10']:.4f}"
        )
        for t in TYPES:
            if f"{t}/count" in m:
                print(f"  {t} ({m[f'{t}/count']:,.0f}) N@10 critique {m[f'{t}/critique/ndcg@10']:.4f}  "
                      f"filter {m[f'{t}/filter/ndcg@10']:.4f}")  # fmt: skip
        sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
