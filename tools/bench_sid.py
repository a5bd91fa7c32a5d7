"""Benchmark of the semantic-ID stage: text encoding and quantisation, timed separately.

Item texts are synthetic but shaped like a catalogue (brand, adjectives, a noun drawn from the
leaf category's own words, a three-level category path, a price), composed with the stage's own
``compose_text``. Encoding is timed once, on at most ``--encode-items`` texts (a 2-core CPU
encodes tens of texts a second); when that is fewer than N, the other embeddings are blends of
two encoded ones (see ``grow``), so quantisation always runs on the full N. Printed: encoding items/s and GFLOP/s, and per N the
quantisation fit and assignment seconds and GFLOP/s, the dedup + table + trie seconds, and a plain
matmul's GFLOP/s measured in the same run as the baseline.

    python tools/bench_sid.py --items 100000 1000000 --encode-items 5000
    python tools/bench_sid.py --items 100000 --rqvae --rqvae-epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_rec.sid.config import KMeansConfig, RQVAEConfig
from moe_rec.sid.embed import TextEncoder
from moe_rec.sid.item_text import compose_text
from moe_rec.sid.residual_kmeans import ResidualKMeans
from moe_rec.sid.rqvae import RQVAEQuantizer
from moe_rec.sid.stats import codebook_usage, collision_rate
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import SIDTrie

SYLLABLES = "ka lo mi ra su te vi no pe za ri mo lu ne ta fi go be sa do".split()
ADJECTIVES = "gentle organic matte hydrating daily travel classic deluxe mini natural fresh bold".split()


def synthetic_texts(n: int, seed: int) -> list[str]:
    """``n`` product texts; items of one leaf category share its nouns, brands span categories."""
    rng = np.random.default_rng(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4)))

    tops = [word().title() for _ in range(8)]
    tree = [
        (top, word().title(), word().title()) for top in tops for _ in range(6) for _ in range(5)
    ]  # 240 leaves
    nouns = [[word() for _ in range(6)] for _ in tree]
    brands = [word().title() for _ in range(800)]
    leaf = rng.integers(0, len(tree), n)
    texts = []
    for i in range(n):
        title = " ".join(
            [
                brands[rng.integers(len(brands))],
                *rng.choice(ADJECTIVES, size=rng.integers(1, 3), replace=False),
                *rng.choice(nouns[leaf[i]], size=2, replace=False),
                f"{rng.integers(1, 500)} ml",
            ]
        )
        price = float(np.round(rng.lognormal(3, 1), 2))
        texts.append(compose_text(title, list(tree[leaf[i]]), None, price, None))
    return texts


def matmul_gflops(dim: int, k: int) -> float:
    """GFLOP/s of a (65536, dim) @ (dim, k) float32 matmul: the ceiling the distance kernels chase."""
    a, b = torch.randn(65_536, dim), torch.randn(dim, k)
    a @ b
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    return 2 * 65_536 * dim * k * reps / (time.perf_counter() - start) / 1e9


def encoder_flops(encoder: TextEncoder, texts: list[str]) -> tuple[float, int]:
    """FLOPs of encoding ``texts`` as 2 x (non-embedding parameters) x tokens, the transformer's
    linear layers (attention scores, a few percent at these lengths, left out); and the tokens."""
    model = encoder.load_model()
    params = sum(p.numel() for name, p in model[0].auto_model.named_parameters() if "embeddings" not in name)
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    tokens = sum(len(x) for x in ids)
    return 2.0 * params * tokens, tokens


def bench_encoding(encoder: TextEncoder, texts: list[str]) -> dict[str, Any]:
    """Encode ``texts`` (no cache) and time it."""
    start = time.perf_counter()
    embeddings = encoder.encode(texts)
    seconds = time.perf_counter() - start
    flops, tokens = encoder_flops(encoder, texts)
    return {
        "embeddings": embeddings,
        "encoded": len(texts),
        "encode_s": seconds,
        "encode_items_per_s": len(texts) / seconds,
        "encode_gflops": flops / seconds / 1e9,
        "tokens_per_text": tokens / len(texts),
    }


def grow(embeddings: torch.Tensor, n: int, mix: float, seed: int) -> torch.Tensor:
    """(n, D): the rows of ``embeddings`` (M, D), then ``n - M`` blends ``(1 - a) e_i + a e_j`` of an
    encoded item ``i`` (in turn) with a random one ``j``, ``a ~ U(0, mix)``, re-normalised, so the
    extra items lie between real ones instead of on top of them."""
    m = len(embeddings)
    if n <= m:
        return embeddings[:n]
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n - m) % m
    other = torch.randint(0, m, (n - m,), generator=g)
    a = torch.rand(n - m, 1, generator=g) * mix
    extra = F.normalize((1 - a) * embeddings[base] + a * embeddings[other], dim=1)
    return torch.cat([embeddings, extra])


def kmeans_flops(report: dict[str, Any], n_fit: int, n_all: int, k: int, d: int) -> tuple[float, float]:
    """Distance FLOPs of fitting (k-means++ seeding + every Lloyd assignment) and of assigning all."""
    fit = 0.0
    for level in report["levels"]:
        fit += 2.0 * n_fit * d * k  # k-means++: one (N, D) @ (D,) per chosen centroid
        fit += 2.0 * n_fit * k * d * (level["lloyd_updates"] + 1)
    return fit, 2.0 * n_all * k * d * len(report["levels"])


def trie_step_ms(trie: SIDTrie, table: SIDTable, beams: int, seed: int) -> list[float]:
    """Milliseconds of one ``allowed`` call per depth for ``beams`` prefixes of real items (mixed services)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(table), (beams,), generator=g)
    out = []
    for depth in range(trie.depth):
        prefix, services = table.codes[rows, :depth], table.service_index[rows]
        trie.allowed(services, prefix)
        start = time.perf_counter()
        reps = 20
        for _ in range(reps):
            trie.allowed(services, prefix)
        out.append((time.perf_counter() - start) / reps * 1e3)
    return out


def bench_quantisation(n: int, encoded: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Quantise N items (grown from ``encoded``), then dedup and build the table and trie; time each."""
    row: dict[str, Any] = {"items": n}
    x = grow(F.normalize(encoded, dim=1), n, args.mix, args.seed)
    start = time.perf_counter()
    q = ResidualKMeans.fit(
        x,
        levels=args.levels,
        codebook_size=args.codebook_size,
        iters=args.iters,
        fit_sample=args.fit_sample,
        seed=args.seed,
    )
    row["kmeans_fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    codes = q.encode(x)
    row["kmeans_assign_s"] = time.perf_counter() - start
    fit_flops, assign_flops = kmeans_flops(
        q.report(), min(n, args.fit_sample), n, args.codebook_size, x.shape[1]
    )
    row["kmeans_fit_gflops"] = fit_flops / row["kmeans_fit_s"] / 1e9
    row["kmeans_assign_gflops"] = assign_flops / row["kmeans_assign_s"] / 1e9

    services = np.array(["a", "b", "c"])[np.arange(n) % 3]
    item_ids = np.char.add("item", np.arange(n).astype(str))
    service_index = torch.from_numpy(np.arange(n) % 3)
    row["collision_rate"] = collision_rate(service_index, codes)
    row["codes_used"] = [u["used"] for u in codebook_usage(codes, args.codebook_size)]
    start = time.perf_counter()
    table = SIDTable.from_quantized(
        services=services,
        item_ids=item_ids,
        codes=codes,
        codebook_size=args.codebook_size,
        max_dedup=args.max_dedup,
    )
    trie = table.trie()
    row["dedup_table_trie_s"] = time.perf_counter() - start
    row["trie_allowed_ms"] = trie_step_ms(trie, table, args.beams, args.seed)

    if args.rqvae:
        cfg = RQVAEConfig(epochs=args.rqvae_epochs)
        start = time.perf_counter()
        rq = RQVAEQuantizer.fit(
            x,
            levels=args.levels,
            codebook_size=args.codebook_size,
            cfg=cfg,
            kmeans=KMeansConfig(iters=args.iters, fit_sample=args.fit_sample),
            seed=args.seed,
        )
        row["rqvae_fit_s"] = time.perf_counter() - start  # includes its final encode of all items
        start = time.perf_counter()
        rq.encode(x)
        row["rqvae_assign_s"] = time.perf_counter() - start
        row["rqvae_recon_mse"] = rq.report()["recon_mse"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, nargs="+", default=[100_000], help="catalogue sizes N")
    parser.add_argument(
        "--encode-items", type=int, default=5_000, help="texts actually encoded (once, reused for every N)"
    )
    parser.add_argument("--model", default="default", help="sentence-transformers name or path")
    parser.add_argument("--device", default="cpu", help="encoder device: cpu, cuda or auto")
    parser.add_argument("--batch-size", type=int, default=256, help="encoder batch size")
    parser.add_argument("--mix", type=float, default=0.5, help="largest blend weight of grown embeddings")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--max-dedup", type=int, default=256)
    parser.add_argument("--iters", type=int, default=25, help="Lloyd iterations per level")
    parser.add_argument("--fit-sample", type=int, default=200_000, help="k-means fits on at most this many")
    parser.add_argument("--beams", type=int, default=1024, help="prefixes per timed trie.allowed call")
    parser.add_argument("--rqvae", action="store_true", help="also time RQ-VAE training and assignment")
    parser.add_argument("--rqvae-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    encoder = TextEncoder(args.model, device=args.device, batch_size=args.batch_size)
    encoder.encode(["warm-up"])  # load the model outside the timed region
    baseline = matmul_gflops(384, args.codebook_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; baseline matmul {baseline:.1f} GFLOP/s"
    )
    enc = bench_encoding(encoder, synthetic_texts(min(max(args.items), args.encode_items), args.seed))
    print(
        f"encoding ({args.model}, {args.device}): {enc['encoded']} texts, {enc['tokens_per_text']:.1f} tokens each, "
        f"{enc['encode_s']:.1f}s = {enc['encode_items_per_s']:.1f} items/s, {enc['encode_gflops']:.1f} GFLOP/s"
    )
    embeddings = enc.pop("embeddings")
    rows = [bench_quantisation(n, embeddings, args) for n in args.items]
    print(
        f"residual k-means {args.levels}x{args.codebook_size}, fit on <= {args.fit_sample} items, then all assigned:"
    )
    print(
        f"{'items':>9} {'fit s':>8} {'fit GF/s':>9} {'assign s':>9} {'asg GF/s':>9} {'quant s':>8} "
        f"{'ids s':>7} {'collide':>8} {'codes used':>13}"
    )
    for r in rows:
        print(
            f"{r['items']:>9} {r['kmeans_fit_s']:>8.1f} {r['kmeans_fit_gflops']:>9.1f} {r['kmeans_assign_s']:>9.2f} "
            f"{r['kmeans_assign_gflops']:>9.1f} {r['kmeans_fit_s'] + r['kmeans_assign_s']:>8.1f} "
            f"{r['dedup_table_trie_s']:>7.1f} {r['collision_rate']:>8.3f} {'/'.join(map(str, r['codes_used'])):>13}"
        )
        steps = ", ".join(f"{ms:.2f}" for ms in r["trie_allowed_ms"])
        print(f"{'':>9} trie.allowed for {args.beams} beams, ms per call at depth 0..{args.levels}: {steps}")
        if "rqvae_fit_s" in r:
            print(
                f"{'':>9} RQ-VAE ({args.rqvae_epochs} epochs): fit {r['rqvae_fit_s']:.1f}s, "
                f"assign {r['rqvae_assign_s']:.2f}s, recon mse {r['rqvae_recon_mse']:.5f}"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"baseline_gflops": baseline, "encoding": enc, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
