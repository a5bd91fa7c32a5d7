"""A small real bundle for the serving tests, built in seconds through ``export_model``: a
random-init tiny MoE decoder over three services of 50 items each (two levels of 8 codes plus a
dedup code), with a catalogue of title / brand / categories / price.

``tiny_bundle`` is session-scoped, so every serving test (the Python API and HTTP) shares one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from moe_rec.data.vocab import Vocabulary
from moe_rec.export import export_model
from moe_rec.model import MoERecForCausalLM, build_config
from moe_rec.sid.table import SIDTable

SERVICES = ("delivery", "grocery", "market")  # sorted, as the SID table orders them
ITEMS_PER_SERVICE = 50
LEVELS, K, DEDUP, USER_BUCKETS = 2, 8, 4, 16


def tiny_table(seed: int = 0) -> SIDTable:
    """Distinct random full IDs per service; items ``<service>-<i>``."""
    g = torch.Generator().manual_seed(seed)
    services, item_ids, codes = [], [], []
    for s in SERVICES:
        ids = torch.randperm(K**LEVELS * DEDUP, generator=g)[:ITEMS_PER_SERVICE]  # packed (c1, c2, dedup)
        codes.append(torch.stack([ids // (K * DEDUP), ids // DEDUP % K, ids % DEDUP], 1))
        services += [s] * ITEMS_PER_SERVICE
        item_ids += [f"{s}-{i}" for i in range(ITEMS_PER_SERVICE)]
    return SIDTable(
        services=services, item_ids=item_ids, codes=torch.cat(codes), codebook_size=K, max_dedup=DEDUP
    )


def tiny_catalogue(table: SIDTable) -> pa.Table:
    """One row per item (shuffled against the table's order, plus one item the table lacks)."""
    rows = []
    for service in SERVICES:
        for i in range(ITEMS_PER_SERVICE + 1):
            rows.append(
                {"service": service, "item_id": f"{service}-{i}", "title": f"{service} item {i}",
                 "brand": f"brand-{i % 5}", "categories": [service, f"aisle-{i % 3}"], "price": 1.0 + i}
            )  # fmt: skip
    return pa.Table.from_pylist(rows[::-1])


def tiny_model(vocab: Vocabulary, seed: int = 0) -> MoERecForCausalLM:
    """A random tiny decoder, sharpened so beam scores spread out and ties are unlikely."""
    torch.manual_seed(seed)
    cfg = build_config(
        "tiny", vocab_size=vocab.size, num_domains=len(vocab.services), num_user_buckets=USER_BUCKETS,
        router_mode="domain_user",
    )  # fmt: skip
    model = MoERecForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "domain_bias" in name:
                p.normal_(0, 0.3)
        model.model.embed_tokens.weight.mul_(4.0)
    return model


def make_bundle(out: Path, dtype: str = "float32", order: str = "interleave") -> Path:
    table = tiny_table()
    vocab = table.vocabulary()
    config = {"sequences": {"max_events": 20, "order": order}}
    return export_model(
        tiny_model(vocab), table, vocab, tiny_catalogue(table), out, dtype=dtype, config=config
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 bundle directory (read-only for tests: copy it before damaging it)."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
