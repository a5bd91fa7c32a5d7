"""Benchmark trie-constrained decoding: our batched beam search against ``transformers`` ``generate``.

Both decode the same random model on the same left-padded prompts (random cross-service
histories, each ending with the requested service's token) over a synthetic semantic-ID
catalogue:

* **ours** — :func:`moe_rec.eval.beam_search.constrained_beam_search`: one prefill over the
  prompts, then a cache whose beams share their prompt's keys (``BeamCache``), the next-code
  mask of all beams from the tensor trie;
* **generate** (the baseline) — ``model.generate(num_beams=W, max_new_tokens=L+1,
  prefix_allowed_tokens_fn=...)`` with a Python callback that walks a dict trie of token ids, once
  per beam and step (``length_penalty=0`` so its scores are plain sums of log-probabilities).

It first checks that both return the same top item (and score) for the first few prompts, then
times each batch size: latency per batch (p50 / p99 over the iterations) and users (prompts) per
second, and prints the speed-up of ours over generate.

    python tools/bench_decode.py --device cpu --size tiny --batch-sizes 1 256 --iters 20 3
    python tools/bench_decode.py --device cuda --size small --dtype bfloat16 --batch-sizes 1 256 --iters 50 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from moe_rec.data.vocab import BOS, Vocabulary
from moe_rec.eval.beam_search import constrained_beam_search
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.model.choices import MODEL_SIZES
from moe_rec.sid.dedup import assign_dedup
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import SIDTrie

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_table(services: int, items: int, levels: int, codebook: int, seed: int) -> SIDTable:
    """``items`` random IDs per service; items sharing ``(c_1..c_L)`` get dedup codes 0, 1, ..."""
    rng = np.random.default_rng(seed)
    service_col = [f"service{s}" for s in range(services) for _ in range(items)]
    item_col = [f"{s}-{i}" for s in service_col[::items] for i in range(items)]
    codes = torch.from_numpy(rng.integers(0, codebook, (services * items, levels)))  # (N, L)
    depth = int(assign_dedup(service_col, item_col, codes, max_dedup=items).max()) + 1  # deepest collision
    return SIDTable.from_quantized(
        services=service_col, item_ids=item_col, codes=codes, codebook_size=codebook, max_dedup=depth
    )


def make_prompts(
    table: SIDTable, vocab: Vocabulary, batch: int, history: int, users: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``batch`` left-padded prompts of ``history // 2 .. history`` random events, a random requested
    service each: input_ids, attention_mask, domain_ids (B, T), user_ids (B,); and the services."""
    g = torch.Generator().manual_seed(seed)
    codes, services = table.codes.tolist(), table.service_index.tolist()
    rows, doms, wanted = [], [], []
    for _ in range(batch):
        n = int(torch.randint(history // 2, history + 1, (1,), generator=g))
        ids, dom = [BOS], []
        for r in torch.randint(0, len(table), (n,), generator=g).tolist():
            tokens = vocab.item_tokens(table.services[services[r]], codes[r])
            ids += tokens
            dom += [services[r]] * len(tokens)
        s = table.services[int(torch.randint(0, len(table.services), (1,), generator=g))]
        ids.append(vocab.service_token(s))
        dom.append(vocab.service_index(s))
        rows.append(ids)
        doms.append([dom[0], *dom])
        wanted.append(s)
    t = max(map(len, rows))
    pad = [t - len(r) for r in rows]
    batch_inputs = {
        "input_ids": torch.tensor([[0] * p + r for p, r in zip(pad, rows)]),
        "attention_mask": torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)]),
        "domain_ids": torch.tensor([[0] * p + d for p, d in zip(pad, doms)]),
        "user_ids": torch.randint(0, users, (batch,), generator=g),
    }
    return batch_inputs, wanted


def token_trie(table: SIDTable, vocab: Vocabulary) -> dict[str, tuple[list[int], dict]]:
    """Per service a dict trie over item tokens; each node is ``(allowed next tokens, children)``."""
    roots: dict[str, tuple[list[int], dict]] = {s: ([], {}) for s in table.services}
    for s_idx, codes in zip(table.service_index.tolist(), table.codes.tolist()):
        node = roots[table.services[s_idx]]
        for token in vocab.item_tokens(table.services[s_idx], codes)[1:]:
            if token not in node[1]:
                node[0].append(token)
                node[1][token] = ([], {})
            node = node[1][token]
    return roots


def prefix_fn(
    roots: dict[str, tuple[list[int], dict]], services: list[str], prompt_len: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """The per-beam callback ``generate`` calls: walk the trie along the beam's generated tokens."""
    dead = [0]  # a beam that already left the trie has score -inf; any token keeps it there

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = roots[services[batch_id]]
        for token in sent[prompt_len:].tolist():
            child = node[1].get(token)
            if child is None:
                return dead
            node = child
        return node[0]

    return allowed


def run_ours(
    model: MoERecForCausalLM,
    trie: SIDTrie,
    vocab: Vocabulary,
    inputs: dict[str, torch.Tensor],
    services: list[str],
    beams: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our beam search: codes (B, W, L+1) and scores (B, W)."""
    return constrained_beam_search(model, trie, vocab, **inputs, services=services, beam_width=beams)


@torch.inference_mode()
def run_generate(
    model: MoERecForCausalLM,
    roots: dict[str, tuple[list[int], dict]],
    vocab: Vocabulary,
    inputs: dict[str, torch.Tensor],
    services: list[str],
    beams: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate`` with the callback; returns codes (B, W, L+1) and scores (B, W) like ours."""
    t, depth = inputs["input_ids"].shape[1], vocab.levels + 1
    out = model.generate(
        **inputs,
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=depth,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=False,
        prefix_allowed_tokens_fn=prefix_fn(roots, services, t),
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    starts = torch.tensor([vocab.code_token_range(d)[0] for d in range(depth)], device=out.sequences.device)
    codes = (out.sequences[:, t:] - starts).reshape(-1, beams, depth)
    return codes, out.sequences_scores.reshape(-1, beams)


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``iters`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation) of ``values``."""
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--size", choices=MODEL_SIZES, default="small", help="model size")
    p.add_argument("--services", type=int, default=3)
    p.add_argument("--items", type=int, default=20000, help="items per service")
    p.add_argument("--levels", type=int, default=3, help="L, quantiser codes per item")
    p.add_argument("--codebook", type=int, default=256, help="K, codes per level")
    p.add_argument("--history", type=int, default=20, help="events per prompt (at most; at least half)")
    p.add_argument("--users", type=int, default=4096, help="user buckets")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--iters", type=int, nargs="+", default=[20, 5], help="timed iterations per batch size")
    p.add_argument("--check", type=int, default=8, help="prompts whose top item both paths must agree on")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.iters) not in (1, len(args.batch_sizes)):
        p.error("--iters takes one value or one per batch size")
    iters = args.iters * len(args.batch_sizes) if len(args.iters) == 1 else args.iters
    device = torch.device(args.device)

    table = synthetic_table(args.services, args.items, args.levels, args.codebook, args.seed)
    vocab = table.vocabulary()
    trie, roots = table.trie().to(device), token_trie(table, vocab)
    torch.manual_seed(args.seed)
    cfg = build_config(
        args.size, vocab_size=vocab.size, num_domains=len(vocab.services), num_user_buckets=args.users
    )
    model = MoERecForCausalLM(cfg).to(device, DTYPES[args.dtype]).eval()
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    print(
        f"model {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{cfg.router_mode} routing, {args.dtype}); {args.services} services x {args.items} items, "
        f"L={args.levels}, K={args.codebook}, dedup<{table.max_dedup}; beams {args.beams}"
    )

    inputs, services = make_prompts(table, vocab, args.check, args.history, args.users, args.seed + 1)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    ours_codes, ours_scores = run_ours(model, trie, vocab, inputs, services, args.beams)
    gen_codes, gen_scores = run_generate(model, roots, vocab, inputs, services, args.beams)
    same_top = int((ours_codes[:, 0] == gen_codes[:, 0]).all(1).sum())
    same_sets = sum(
        set(map(tuple, a.tolist())) == set(map(tuple, b.tolist())) for a, b in zip(ours_codes, gen_codes)
    )
    score_diff = float((ours_scores[:, 0] - gen_scores[:, 0].float()).abs().max())
    print(
        f"agreement: top item {same_top}/{args.check}; top-{args.beams} sets equal {same_sets}/{args.check}; "
        f"max |score diff| of top item {score_diff:.2e}"
    )
    if not bool(trie.contains(services, ours_codes[:, 0]).all()):
        raise SystemExit("beam search returned an invalid item")

    header = f"{'batch':>5} {'path':<9} {'iters':>5} {'p50 ms':>10} {'p99 ms':>10} {'users/s':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for batch, n in zip(args.batch_sizes, iters):
        inputs, services = make_prompts(table, vocab, batch, args.history, args.users, args.seed + batch)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        rates = {}
        for name, fn in (
            ("ours", partial(run_ours, model, trie, vocab, inputs, services, args.beams)),
            ("generate", partial(run_generate, model, roots, vocab, inputs, services, args.beams)),
        ):
            ms = timed(fn, n, device)
            rates[name] = batch / (statistics.mean(ms) / 1e3)
            print(
                f"{batch:>5} {name:<9} {n:>5} {percentile(ms, 50):>10.1f} {percentile(ms, 99):>10.1f} "
                f"{rates[name]:>10.1f}"
            )
        print(
            f"{batch:>5} {'speed-up':<9} {'':>5} {'':>10} {'':>10} {rates['ours'] / rates['generate']:>9.1f}x"
        )


if __name__ == "__main__":
    main()
