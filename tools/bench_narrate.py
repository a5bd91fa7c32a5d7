"""Benchmark narrative decoding: the KV-cached greedy decoder against the uncached reference.

Both write the same narratives (:func:`moe_rec.eval.narrate.write_narratives`, ``use_cache``
True / False) for the same requests, in the same run, one request at a time, alternating which
goes first:

* **uncached** (the reference, and what serving did before) — every step reruns the decoder over
  every unfinished prompt in full;
* **cached** — one prefill, then one position per unfinished narrative a step.

A request is what ``Recommender.recommend(..., explain=True)`` narrates: a random cross-service
history of ``--history // 2 .. --history`` catalogue items (optionally a critique of
``--critique-words`` random subwords), and ``--k`` random items of a random asked service, one
narrative each (``--k`` prompts decoded together, up to ``--max-tokens`` subwords). Printed: time
per request (p50 and mean) of each, the ratio, the mean narrative length, and how many requests
the two decoded differently (0 expected: they are the same greedy decoding).

The model is a run's bundle (``BUNDLE``), or random weights of the model ``--config`` describes
(default: the demo's, ``configs/experiments/demo.yaml``: its size, item-level heads and per-item
terms) over a random catalogue of ``--items`` items per service and a ``--text-size``-subword text
vocabulary (the demo's tokenizer has 2,606). An untrained text head rarely writes ``[EOS]``, so its
narratives run to ``--max-tokens``: the longest decoding there is.

    python tools/bench_narrate.py --requests 20 --torch-threads 1
    python tools/bench_narrate.py runs/demo/bundle --requests 40 --torch-threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from moe_rec.config import load_config
from moe_rec.data.sequences import prompt, user_bucket
from moe_rec.data.vocab import CRITIQUE, Vocabulary
from moe_rec.eval.narrate import MAX_NARRATIVE_TOKENS, narrative_prompt, write_narratives
from moe_rec.experiment import ExperimentConfig
from moe_rec.model import MoERecForItemPrediction, model_class
from moe_rec.train.trainer import model_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SERVICES = ("delivery", "grocery", "marketplace")  # the synthetic data's
DEMO_TEXT_SIZE = 2606  # subwords of the demo's critique tokenizer
TEXT_DIM = 384  # MiniLM, the demo's item text encoder


def random_model(
    config: Path, items: int, text_size: int, seed: int
) -> tuple[MoERecForItemPrediction, Vocabulary, dict[str, torch.Tensor]]:
    """Random weights of ``config``'s item-level model with a text head over a random catalogue of
    ``items`` distinct IDs per service; returns the model, its vocabulary and each service's codes
    (N_s, L + 1)."""
    cfg = load_config(ExperimentConfig, config)
    if cfg.model.kind != "item":
        raise SystemExit(f"{config}: model.kind {cfg.model.kind!r}; narratives need the item-level model")
    vocab = Vocabulary(
        services=DEMO_SERVICES, levels=cfg.sid.levels, codebook_size=cfg.sid.codebook_size,
        dedup_size=cfg.sid.max_dedup, text_size=text_size,
    )  # fmt: skip
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    codes = {}
    for s in vocab.services:  # random codes; the last two count up, so every ID is distinct
        c = torch.randint(vocab.codebook_size, (items, vocab.levels + 1), generator=g)
        c[:, -1] = torch.arange(items) % min(vocab.codebook_size, vocab.dedup_size)
        c[:, -2] = (torch.arange(items) // min(vocab.codebook_size, vocab.dedup_size)) % vocab.codebook_size
        codes[s] = c
    n = items * len(vocab.services)
    mcfg = model_config(cfg.model, vocab, n, TEXT_DIM)
    model = model_class(mcfg)(mcfg).eval()
    if model.item_embed is not None:
        services = torch.cat([torch.full((items,), vocab.service_token(s)) for s in vocab.services])
        model.set_train_catalogue(torch.cat(list(codes.values())), services)
    if model.text_proj is not None:
        model.set_item_text(torch.randn(n, TEXT_DIM, generator=g))
    return model, vocab, codes


def bundle_model(path: Path) -> tuple[MoERecForItemPrediction, Vocabulary, dict[str, torch.Tensor]]:
    """A bundle's model, vocabulary and each service's item codes."""
    from moe_rec.export.bundle import load_bundle

    bundle = load_bundle(path)
    if not isinstance(bundle.model, MoERecForItemPrediction) or bundle.model.config.text_token_range is None:
        raise SystemExit(f"{path}: not an item-level model with a text head (trained with critiques)")
    table, vocab = bundle.table, bundle.vocab
    codes = {s: table.codes[table.service_index == i] for i, s in enumerate(table.services)}
    return bundle.model.eval(), vocab, codes


def requests(
    vocab: Vocabulary,
    codes: dict[str, torch.Tensor],
    buckets: int,
    n: int,
    history: int,
    k: int,
    critique: int,
    seed: int,
) -> list[tuple[list[dict], list[int]]]:
    """``n`` requests: each its ``k`` narrative prompts and their user buckets (of ``buckets``)."""
    rng = random.Random(seed)
    services = list(codes)
    out = []
    for r in range(n):
        events = []
        for _ in range(rng.randint(max(1, history // 2), history)):
            s = rng.choice(services)
            events.append((s, codes[s][rng.randrange(len(codes[s]))].tolist()))
        asked = rng.choice(services)
        request = prompt(vocab, events, asked)
        if critique:  # [CRITIQUE] and random subwords before the asked service's token
            words = [CRITIQUE, *(vocab.text_offset + rng.randrange(vocab.text_size) for _ in range(critique))]
            request = {
                "input_ids": [*request["input_ids"][:-1], *words, request["input_ids"][-1]],
                "domain_ids": [*request["domain_ids"][:-1], *[request["domain_ids"][-1]] * (len(words) + 1)],
            }
        picks = rng.sample(range(len(codes[asked])), k)
        prompts = [
            narrative_prompt(request, vocab.item_tokens(asked, codes[asked][i].tolist()), vocab)
            for i in picks
        ]
        out.append((prompts, [user_bucket(f"user{r}", buckets)] * k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle (default: random weights of --config)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs/experiments/demo.yaml")
    parser.add_argument("--items", type=int, default=800, help="items per service of the random catalogue")
    parser.add_argument("--text-size", type=int, default=DEMO_TEXT_SIZE, help="subwords of the random model")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--history", type=int, default=20, help="longest history (events)")
    parser.add_argument("--k", type=int, default=5, help="narratives per request")
    parser.add_argument("--critique-words", type=int, default=0, help="a critique of this many subwords")
    parser.add_argument("--max-tokens", type=int, default=MAX_NARRATIVE_TOKENS)
    parser.add_argument("--warmup", type=int, default=2, help="requests decoded both ways before timing")
    parser.add_argument("--torch-threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.bundle:
        model, vocab, codes = bundle_model(args.bundle)
        source = str(args.bundle)
    else:
        model, vocab, codes = random_model(args.config, args.items, args.text_size, args.seed)
        source = f"random weights of {args.config.name}"
    n = args.warmup + args.requests
    work = requests(
        vocab, codes, model.config.num_user_buckets, n, args.history, args.k, args.critique_words, args.seed
    )
    times: dict[bool, list[float]] = {False: [], True: []}
    differ, lengths = 0, []
    for r, (prompts, buckets) in enumerate(work):
        texts = {}
        for use_cache in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
            t0 = time.perf_counter()
            texts[use_cache] = write_narratives(
                model, prompts, buckets, vocab, args.max_tokens, use_cache=use_cache
            )
            if r >= args.warmup:
                times[use_cache].append(time.perf_counter() - t0)
        if r >= args.warmup:
            differ += texts[True] != texts[False]
            lengths += [len(t) for t in texts[True]]

    cfg = model.config
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"model: {source}; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_experts} experts ({cfg.router_mode} router) per MoE layer"
    )
    prompt_len = statistics.mean(len(p["input_ids"]) for ps, _ in work for p in ps)
    print(
        f"{args.requests} requests, {args.k} narratives each (up to {args.max_tokens} subwords; mean "
        f"{statistics.mean(lengths):.1f} written), prompts of {prompt_len:.0f} tokens on average\n"
    )
    print(f"{'':12}{'p50 ms':>10}{'mean ms':>10}{'min ms':>10}")
    for name, use_cache in (("uncached", False), ("cached", True)):
        t = [1000 * x for x in times[use_cache]]
        print(f"{name:12}{statistics.median(t):10.1f}{statistics.mean(t):10.1f}{min(t):10.1f}")
    p50 = statistics.median(times[False]) / statistics.median(times[True])
    mean = statistics.mean(times[False]) / statistics.mean(times[True])
    print(f"\nuncached / cached: {p50:.2f}x at p50, {mean:.2f}x on the mean")
    print(f"requests decoded differently: {differ} of {args.requests}")


if __name__ == "__main__":
    main()
