"""Benchmark the HTTP service under concurrent load against the Python API called one at a time.

* **server** — ``moe-rec serve BUNDLE`` started on loopback in a subprocess (or ``--url`` of a
  running one); ``--clients`` threads, each with one keep-alive connection, send ``--requests``
  ``POST /v1/recommend`` each, back to back. Latency is measured by the client (p50 / p99), the
  throughput over the whole run, and the mean batch size from the server's ``/metrics``
  (decoded requests / batches over the run).
* **Python API, one at a time** (the baseline, measured in the same run after the server has
  stopped, so the two never share the CPU) — :meth:`Recommender.recommend` on the same requests,
  sequentially, each decoded alone (``max_wait_ms=0``: nobody else is coming).

Requests are random cross-service histories of ``--history`` // 2 .. ``--history`` catalogue
items, a random requested service and ``k=--k``. ``--synthetic SIZE`` first exports a
random-weight bundle of a ``build_config`` size over 3 services x ``--items`` random semantic IDs.

    python tools/bench_serve.py BUNDLE --clients 8 --requests 200
    python tools/bench_serve.py --synthetic small --items 2000 --clients 8 --requests 100
    python tools/bench_serve.py BUNDLE --url http://10.0.0.5:8000 --clients 32 --requests 500
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from moe_rec.export.bundle import CATALOGUE_FILE, export_model
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.model.choices import MODEL_SIZES
from moe_rec.serve.config import DEFAULT_K, ServeConfig
from moe_rec.serve.recommender import Recommender
from moe_rec.sid.dedup import assign_dedup
from moe_rec.sid.table import SIDTable

SERVICES = ("delivery", "grocery", "marketplace")


def synthetic_bundle(out: Path, size: str, items: int, levels: int = 3, codebook: int = 64) -> Path:
    """A random ``size`` model over ``items`` random semantic IDs per service, exported for real."""
    rng = np.random.default_rng(0)
    services = [s for s in SERVICES for _ in range(items)]
    item_ids = [f"{s}-{i}" for s in SERVICES for i in range(items)]
    codes = torch.from_numpy(rng.integers(0, codebook, (len(services), levels)))  # (N, L)
    depth = int(assign_dedup(services, item_ids, codes, max_dedup=items).max()) + 1  # deepest collision
    table = SIDTable.from_quantized(
        services=services, item_ids=item_ids, codes=codes, codebook_size=codebook, max_dedup=depth
    )
    vocab = table.vocabulary()
    torch.manual_seed(0)
    cfg = build_config(
        size, vocab_size=vocab.size, num_domains=len(vocab.services), router_mode="domain_user"
    )
    catalogue = pa.table(
        {"service": services, "item_id": item_ids, "title": [f"{i} title" for i in item_ids],
         "price": rng.uniform(1, 100, len(services)).round(2)}
    )  # fmt: skip
    model = MoERecForCausalLM(cfg).eval()
    return export_model(model, table, vocab, catalogue, out, config={"sequences": {"max_events": 50}})


def make_requests(
    bundle: Path, n: int, history: int, k: int, seed: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """``n`` random requests over the bundle's catalogue; ``extra``: more fields for each
    (``critique``, ``explain``)."""
    rows = pq.read_table(bundle / CATALOGUE_FILE, columns=["service", "item_id"]).to_pylist()
    by_service: dict[str, list[str]] = {}
    for row in rows:
        by_service.setdefault(row["service"], []).append(row["item_id"])
    rng, services = random.Random(seed), sorted(by_service)
    out = []
    for _ in range(n):
        events = []
        for _ in range(rng.randint(max(history // 2, 1), history)):
            s = rng.choice(services)
            events.append({"service": s, "item_id": rng.choice(by_service[s])})
        out.append({"history": events, "service": rng.choice(services), "k": k, **(extra or {})})
    return out


class Client:
    """One keep-alive connection; ``post`` returns the status and the client-side seconds."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def get(self, path: str) -> str:
        self.conn.request("GET", path)
        return self.conn.getresponse().read().decode()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, float]:
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0


def recommender_counts(url: str) -> np.ndarray:
    """(decoded requests, batches, seconds spent decoding) so far, from the server's /metrics."""
    text = Client(url).get("/metrics")
    values = {k: float(v) for k, v in re.findall(r"^moe_rec_recommender_(\w+) (\S+)$", text, re.M)}
    return np.array([values["requests"], values["batches"], values["mean_batch_seconds"] * values["batches"]])


def start_server(bundle: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    """``moe-rec serve`` on a free loopback port; returns the process and its URL (from its log)."""
    cmd = [sys.executable, "-m", "moe_rec.cli", "serve", str(bundle), "--port", "0",
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-k", str(args.max_k)]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if found := re.search(r"moe-rec serving at (http://\S+)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the log
            return proc, found.group(1)
    raise SystemExit(f"the server exited with {proc.wait()} before serving:\n{''.join(lines)}")


def drive(url: str, requests: list[dict[str, Any]], clients: int) -> tuple[list[float], float, int]:
    """Send ``requests`` over ``clients`` concurrent connections; latencies, wall seconds, errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(part: list[dict[str, Any]]) -> None:
        c, mine, bad = Client(url), [], 0
        for body in part:
            status, seconds = c.post("/v1/recommend", body)
            mine.append(seconds)
            bad += status != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=run, args=(requests[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, errors[0]


def quantiles_ms(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (or --synthetic)")
    parser.add_argument("--synthetic", choices=MODEL_SIZES, help="export a random bundle first")
    parser.add_argument("--items", type=int, default=2000, help="items per service of --synthetic")
    parser.add_argument("--url", help="a running server instead of starting one")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--baseline-requests", type=int, default=200, help="sent one at a time")
    parser.add_argument("--history", type=int, default=20, help="longest history (events)")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--critique", help="send this critique with every request (a bundle with text)")
    parser.add_argument("--explain", action="store_true", help="ask for every item's narrative")
    parser.add_argument(
        "--max-k", type=int, default=ServeConfig.max_k, help="the server's --max-k (beam width)"
    )
    parser.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size)
    parser.add_argument("--max-wait-ms", type=float, default=ServeConfig.max_wait_ms)
    parser.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--torch-threads", type=int, help="model CPU threads, server and baseline alike")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.bundle is None) == (args.synthetic is None):
        parser.error("give a BUNDLE or --synthetic SIZE")
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if args.synthetic:
            t0 = time.perf_counter()
            bundle = synthetic_bundle(Path(tmp) / "bundle", args.synthetic, args.items)
            print(f"exported a random {args.synthetic} bundle ({3 * args.items:,} items) in "
                  f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
        total = args.clients * args.requests
        extra = {"critique": args.critique} if args.critique else {}
        extra |= {"explain": True} if args.explain else {}
        requests = make_requests(bundle, total + args.clients * 4, args.history, args.k, args.seed, extra)
        warmup, requests = requests[total:], requests[:total]
        threads = args.torch_threads or torch.get_num_threads()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; torch "
              f"{torch.__version__}, {threads} threads; device {args.device or 'auto'}")  # fmt: skip

        proc, url = (None, args.url) if args.url else start_server(bundle, args)
        try:
            drive(url, warmup, args.clients)  # first batches pay for lazy initialisation
            before = recommender_counts(url)
            latencies, wall, errors = drive(url, requests, args.clients)
            decoded, batches, decode_s = recommender_counts(url) - before
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        rec = Recommender.from_bundle(
            bundle, ServeConfig(device=args.device, max_batch_size=1, max_wait_ms=0, max_k=args.max_k)
        )
        base = requests[: args.baseline_requests]
        for body in warmup[:4]:
            rec.recommend(**body)
        base_latencies = []
        t0 = time.perf_counter()
        for body in base:
            t1 = time.perf_counter()
            rec.recommend(**body)
            base_latencies.append(time.perf_counter() - t1)
        base_wall = time.perf_counter() - t0
        rec.close()

    p50, p99 = quantiles_ms(latencies)
    b50, b99 = quantiles_ms(base_latencies)
    rps, base_rps = total / wall, len(base) / base_wall
    mean_batch = decoded / max(batches, 1)
    print(f"\n{'':34}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'mean batch':>12}")
    print(f"{f'HTTP, {args.clients} clients':34}{total:>9}{errors:>8}{p50:>9.1f}{p99:>9.1f}{rps:>9.1f}"
          f"{mean_batch:>12.2f}")  # fmt: skip
    print(
        f"{'Python API, one at a time':34}{len(base):>9}{0:>8}{b50:>9.1f}{b99:>9.1f}{base_rps:>9.1f}{1:>12.2f}"
    )
    print(f"server: {batches:.0f} batches, {1000 * decode_s / max(batches, 1):.1f} ms decoding each, "
          f"decoding {100 * decode_s / wall:.0f}% of the wall time; load average at the end "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"\nthroughput: HTTP / one at a time = {rps / base_rps:.2f}x; "
          f"p50 latency: HTTP / one at a time = {p50 / b50:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
