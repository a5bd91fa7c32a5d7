"""A tiny sequences directory (what ``moe-rec sequences build`` writes) and the SID table it was
made from, with a learnable pattern: every user walks a service's catalogue in order, so the next
item's codes are predictable."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from moe_rec.config import load_config
from moe_rec.data.sequences import IGNORE_INDEX, SAMPLE_FEATURES
from moe_rec.data.vocab import BOS, Vocabulary
from moe_rec.experiment import ExperimentConfig
from moe_rec.sid.table import SIDTable

ROOT = Path(__file__).resolve().parents[2]
VOCAB = Vocabulary(services=("grocery", "market"), levels=2, codebook_size=8, dedup_size=2)
ITEMS = 8  # per service; item i has codes (i % 8, (3 * i) % 8, i % 2)


def _codes(i: int) -> list[int]:
    return [i % 8, (3 * i) % 8, i % 2]


def _encode(events: list[tuple[int, int]], label: bool) -> dict[str, list[int]]:
    ids, doms, labels = [BOS], [events[0][0] if events else 0], [IGNORE_INDEX]
    for s, i in events:
        toks = VOCAB.item_tokens(VOCAB.services[s], _codes(i))
        ids += toks
        doms += [s] * len(toks)
        labels += [IGNORE_INDEX] + (toks[1:] if label else [IGNORE_INDEX] * (len(toks) - 1))
    return {"input_ids": ids, "domain_ids": doms, "labels": labels}


def sid_table() -> SIDTable:
    """Item ``i`` of every service has codes :func:`_codes` (i)."""
    keys = [(s, i) for s in VOCAB.services for i in range(ITEMS)]
    table = SIDTable(
        services=[s for s, _ in keys], item_ids=[str(i) for _, i in keys],
        codes=torch.tensor([_codes(i) for _, i in keys]), codebook_size=VOCAB.codebook_size,
        max_dedup=VOCAB.dedup_size,
    )  # fmt: skip
    assert table.vocabulary() == VOCAB
    return table


def write_sequences(run_dir: Path, num_users: int = 48, parts: int = 2, test: bool = False) -> None:
    """``<run_dir>/sequences`` (train and valid, and test with ``test``) and ``<run_dir>/sids``."""
    sid_table().save(run_dir / "sids")
    seq = run_dir / "sequences"
    seq.mkdir(parents=True, exist_ok=True)
    (seq / "vocab.json").write_text(json.dumps(VOCAB.to_dict()))
    rows: dict[str, list[dict]] = {"train": [], "valid": [], **({"test": []} if test else {})}
    for u in range(num_users):
        s, start = (u // 2) % 2, u % ITEMS  # both services in every part file
        history = [(s, (start + k) % ITEMS) for k in range(6)]
        for end in (3, 4):  # two training windows per user
            rows["train"].append(
                {"user": f"u{u}", "service": VOCAB.services[s], **_encode(history[:end], label=True)}
            )
        for split, end in (("valid", 4), ("test", 5)):  # leave-one-out: event `end` held out
            if split not in rows:
                continue
            ctx = _encode(history[:end], label=False)
            ctx["input_ids"].append(VOCAB.service_token(VOCAB.services[s]))
            ctx["domain_ids"].append(s)
            target = history[end][1]
            rows[split].append(
                {"user": f"u{u}", "service": VOCAB.services[s], "input_ids": ctx["input_ids"],
                 "domain_ids": ctx["domain_ids"], "target": _codes(target), "target_item": str(target)}
            )  # fmt: skip
    for split, items in rows.items():
        feats = SAMPLE_FEATURES[split]
        for p in range(parts):
            part = items[p::parts]
            cols = {name: [r[name] for r in part] for name in feats}
            path = seq / split / f"part-{p:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))


def write_catalogue(run_dir: Path) -> None:
    """``<run_dir>/data/items``: the catalogue of :func:`sid_table`'s items, as ``data prepare`` writes it."""
    import pyarrow as pa

    from moe_rec.data.store import write_items

    keys = [(s, i) for s in VOCAB.services for i in range(ITEMS)]
    write_items(
        pa.table({"service": [s for s, _ in keys], "item_id": [str(i) for _, i in keys],
                  "title": [f"{s} {i}" for s, i in keys], "categories": [[s] for s, _ in keys],
                  "brand": ["acme"] * len(keys), "price": [float(i) for _, i in keys], "text": [""] * len(keys)}),
        run_dir / "data",
    )  # fmt: skip


# The item model's plain recipe: the demo's text terms need item text, which hand-written
# sequences (write_sequences) have none of; a test asks for the item softmax and vectors itself.
PLAIN_ITEM_MODEL = ("model.overrides.item_loss=codes", "model.overrides.item_embedding=false",
                    "model.overrides.item_negatives=0", "model.overrides.item_text=false",
                    "model.overrides.item_text_prior=false")  # fmt: skip


def tiny_config(run_dir: Path, *overrides: str) -> ExperimentConfig:
    """The train demo shrunk to seconds: a tiny model, 4-sample micro batches, no W&B."""
    base = [
        f"run_dir={run_dir}",
        "model.kind=token",  # the demo trains the item-level model; these tests the token-level one
        "model.overrides={hidden_size: 32, head_dim: 16, moe_intermediate_size: 32, num_user_buckets: 64}",
        *PLAIN_ITEM_MODEL,
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.lr=0.01",
        "train.min_lr=0.001",
        "train.eval_every=0",
        "train.save_every=100",
        "train.log_every=2",
        "train.max_eval_samples=8",
        "train.wandb.mode=disabled",
    ]
    return load_config(ExperimentConfig, ROOT / "configs/experiments/demo.yaml", [*base, *overrides])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_sequences(tmp_path / "run")
    return tmp_path / "run"


def wandb_records(run_file: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``, what ``wandb sync`` uploads):
    a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: full / first / middle /
    last), each whole record a ``wandb_internal_pb2.Record``. W&B's service process writes the log
    after ``run.finish()`` returns (on a busy machine, seconds later), so this waits up to
    ``timeout`` seconds for the run's closing ``exit`` record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        data, block = Path(run_file).read_bytes(), 32 * 1024
        records, pos, part = [], 7, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk half written
                break
            part += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # full, last
                record = wandb_internal_pb2.Record()
                record.ParseFromString(part)
                records.append(record)
                part = b""
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
