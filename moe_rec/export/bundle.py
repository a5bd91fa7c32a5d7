"""The export bundle: one self-contained, checksummed directory that serving loads.

Layout::

    <bundle>/manifest.json                 format version, versions, experiment config, source
                                           checkpoint + tag, dtype, created time, sha256 + size of
                                           every other file, and the verification result; for a
                                           model trained with ``train.privacy`` also its privacy
                                           record (epsilon, delta, accountant, noise, clip, ...)
    <bundle>/model/config.json             the MoERecConfig (``save_pretrained``)
    <bundle>/model/model.safetensors       the weights in the export dtype (float32 or bfloat16)
    <bundle>/model/generation_config.json  written by ``save_pretrained``
    <bundle>/sids/sid_table.parquet        every item's semantic ID (``SIDTable.save``)
    <bundle>/sids/sid_table.json
    <bundle>/sids/sid_trie.safetensors     the trie of valid IDs (``SIDTrie.save``); token-level models
                                           only (the item-level model scores every item exactly)
    <bundle>/catalogue.parquet             service, item_id and every catalogue field, in SID-table row order
    <bundle>/vocab.json                    the token layout (``Vocabulary.to_dict``)

:func:`export_model` writes a bundle from an in-memory model into a temporary directory beside
the target, reloads it through :func:`load_bundle` and compares its logits with the fp32 model's
on probe prompts; only a bundle that matches is renamed into place. :func:`load_bundle` checks
every file against the manifest first and refuses a changed, missing or unknown one, naming it.
:func:`export_checkpoint` (ZeRO checkpoint -> bundle) imports the training stage lazily, so the
load path never imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

import moe_rec
from moe_rec.data.positions import item_batch, left_pad
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import prompt, user_bucket
from moe_rec.data.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from moe_rec.data.vocab import Vocabulary
from moe_rec.errors import MoeRecError
from moe_rec.model import MoERecConfig, MoERecForCausalLM, MoERecForItemPrediction, model_class
from moe_rec.sid.io import SIDFileError, sha256_file
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import TRIE_FILE, SIDTrie

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
SID_DIR = "sids"
CATALOGUE_FILE = "catalogue.parquet"
VOCAB_FILE = "vocab.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# How close the reloaded bundle's logits must be to the fp32 model's on the probe prompts. float32
# reloads bit for bit, so its bounds are absolute and tight. bfloat16 bounds are fractions of the
# largest |logit| (at least 1): on the demo model rounding moved a position's logits by 0.18% of
# that scale at the median and 0.31% at the 99th percentile, but a few positions (tokens whose
# top-k experts change under rounding) by up to 6.2%, so the mean is bounded tightly and the max
# loosely; a wrong weight moves logits by tens of percent and fails both (docs/export.md).
TOLERANCE = {
    "float32": {"max_abs_diff": 1e-5, "mean_abs_diff": 1e-6, "argmax_agreement": 0.99},
    "bfloat16": {"max_abs_diff": 0.2, "mean_abs_diff": 1e-2, "argmax_agreement": 0.9},
}
PROBES = 16  # prompts the verification compares
_SEP = "\x1f"  # joins service and item id into one key (as in the SID table)


class BundleError(MoeRecError, ValueError):
    """A bundle (or an export input) that is missing, inconsistent or changed; names the file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


def _wrapped(error: Exception, path: Path | str) -> BundleError:
    """``error`` as a :class:`BundleError` about ``path``, its message not prefixed twice."""
    message, prefix = str(error), f"{path}: "
    return BundleError(path, message[len(prefix) :] if message.startswith(prefix) else message)


@dataclass
class Bundle:
    """A loaded bundle: everything constrained decoding and serving need."""

    path: Path
    model: MoERecForCausalLM | MoERecForItemPrediction
    table: SIDTable
    trie: SIDTrie | None  # the beam-search trie; None for the item-level model
    vocab: Vocabulary
    catalogue: pa.Table  # row i describes table row i: service, item_id, then the catalogue fields
    manifest: dict[str, Any]
    tokenizer: TextTokenizer | None = None  # the text tokenizer of a model that reads critiques


def _check_vocab(vocab: Vocabulary, table: SIDTable, where: Path | str) -> None:
    """The vocabulary must describe the table's services and code ranges."""
    mine = (list(vocab.services), vocab.levels, vocab.codebook_size, vocab.dedup_size)
    theirs = (table.services, table.levels, table.codebook_size, table.max_dedup)
    if mine != theirs:
        raise BundleError(
            where,
            f"vocabulary (services, levels, codebook, dedup) {mine} does not match the SID table {theirs}",
        )


def _item_keys(services: Sequence[str] | np.ndarray, item_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.char.add(np.char.add(np.asarray(services, dtype=str), _SEP), np.asarray(item_ids, dtype=str))


def _table_services(table: SIDTable) -> np.ndarray:
    return np.asarray(table.services, dtype=str)[table.service_index.numpy()]


def align_catalogue(catalogue: pa.Table, table: SIDTable, where: Path | str = "catalogue") -> pa.Table:
    """The catalogue rows of the table's items, in table row order (items without an ID dropped).

    Raises:
        BundleError: no ``service`` / ``item_id`` column, an item twice, or a table item missing.
    """
    if missing := {"service", "item_id"} - set(catalogue.column_names):
        raise BundleError(where, f"catalogue has no {sorted(missing)} column")
    keys = _item_keys(catalogue.column("service").to_pylist(), catalogue.column("item_id").to_pylist())
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    if len(ordered) > 1 and (dup := np.nonzero(ordered[1:] == ordered[:-1])[0]).size:
        raise BundleError(where, f"catalogue lists item {tuple(str(ordered[dup[0]]).split(_SEP))} twice")
    wanted = _item_keys(_table_services(table), table.item_ids)
    pos = np.searchsorted(ordered, wanted).clip(max=max(len(ordered) - 1, 0))
    found = ordered[pos] == wanted if len(ordered) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        examples = [tuple(str(k).split(_SEP, 1)) for k in wanted[~found][:5]]
        raise BundleError(
            where, f"{int((~found).sum())} items of the SID table are not in the catalogue, e.g. {examples}"
        )
    return catalogue.take(pa.array(order[pos]))


def table_probes(
    table: SIDTable, vocab: Vocabulary, n: int = PROBES, events: int = 6
) -> list[dict[str, Any]]:
    """Deterministic probe prompts from the table's items (when no history rows are at hand):
    ``[BOS]`` + ``events`` items spread over the catalogue + a service token, as eval prompts are."""
    services = _table_services(table)
    rows = []
    for p in range(n):
        picks = [(p * 7919 + e * 104729) % len(table) for e in range(events)]
        items = [(str(services[r]), table.codes[r].tolist()) for r in picks]
        rows.append({"user": f"probe-{p}", **prompt(vocab, items, vocab.services[p % len(vocab.services)])})
    return rows


def _probe_logits(
    model: MoERecForCausalLM | MoERecForItemPrediction, probes: Sequence[Mapping[str, Any]], vocab: Vocabulary
) -> torch.Tensor:
    """Float32 logits at every real position of the left-padded probes: (N, V) of the token-level
    model; (N x P, K) of the item-level one, one row per code position (``-inf`` past a short
    code range read as 0, so differences stay finite)."""
    users = torch.tensor([user_bucket(str(p.get("user", "")), model.config.num_user_buckets) for p in probes])
    with torch.inference_mode():
        if isinstance(model, MoERecForItemPrediction):
            batch = item_batch([{**p, "user": ""} for p in probes], vocab, 1, left_pad=True)
            batch["user_ids"] = users
            logits = model(**batch).logits.float()  # (B, T, P, K)
            real = logits[batch["attention_mask"].bool()]  # (N, P, K)
            return real.masked_fill(torch.isinf(real), 0.0).flatten(0, 1)
        ids, mask, domains = left_pad(probes)
        logits = model(
            ids + model.config.sid_token_offset, domains, user_ids=users, attention_mask=mask
        ).logits.float()
    return logits[mask.bool()]


def _compare(reference: torch.Tensor, exported: torch.Tensor, dtype: str) -> dict[str, Any]:
    """Logit differences of the exported model to the fp32 reference, the bounds, and whether they hold."""
    diff = (exported - reference).abs()
    scale = float(reference.abs().max())
    unit = max(scale, 1.0) if dtype != "float32" else 1.0
    bounds = TOLERANCE[dtype]
    tolerance = {
        "max_abs_diff": bounds["max_abs_diff"] * unit,
        "mean_abs_diff": bounds["mean_abs_diff"] * unit,
        "argmax_agreement": bounds["argmax_agreement"],
    }
    measured = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float((exported.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
    failed = [
        k for k, v in measured.items() if (v < tolerance[k] if k == "argmax_agreement" else v > tolerance[k])
    ]
    return {"positions": int(reference.shape[0]), "logit_scale": scale, **measured,
            "tolerance": tolerance, "failed": failed, "passed": not failed}  # fmt: skip


def _file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """``relative path -> {sha256, size}`` of every file under ``root`` but the manifest."""
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE
    )
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files
    }


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def export_model(
    model: MoERecForCausalLM | MoERecForItemPrediction,
    table: SIDTable,
    vocab: Vocabulary,
    catalogue: pa.Table,
    out: Path | str,
    *,
    dtype: str = "float32",
    config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    probes: Sequence[Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    privacy: dict[str, Any] | None = None,
    tokenizer: TextTokenizer | None = None,
) -> Path:
    """Write a verified bundle of ``model`` (left untouched) to ``out``; returns ``out``.

    Args:
        model: the trained decoder (any device or dtype; compared in fp32 on CPU).
        table: every item's semantic ID; the catalogue must describe each of its items.
        vocab: the token layout the model was trained on (must match the table).
        catalogue: one row per item, ``service`` / ``item_id`` plus any fields (title, brand, ...).
        out: the bundle directory; written beside it first and renamed at the end.
        dtype: ``float32`` or ``bfloat16`` weights.
        config: the experiment config (plain data) to record.
        source: where the model came from (checkpoint, tag) to record.
        probes: rows with ``input_ids`` / ``domain_ids`` (and ``user``) to compare logits on;
            default: prompts made from the table's items.
        overwrite: replace an existing bundle at ``out``.
        privacy: the privacy record of a model trained with ``train.privacy`` (the checkpoint's,
            :meth:`moe_rec.train.privacy.UserLevelDP.record`), written to the manifest as
            ``privacy``; None (any other model): no such key.
        tokenizer: the text tokenizer, required when the vocabulary has text tokens (a model
            trained with critiques and narratives); saved as ``tokenizer.json``.

    Raises:
        BundleError: inconsistent inputs, an existing ``out``, or a reloaded bundle whose logits
            are off by more than :data:`TOLERANCE`.
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise BundleError(out, f"dtype {dtype!r} not in {sorted(DTYPES)}")
    if out.exists() and not overwrite:
        raise BundleError(out, "already exists (pass overwrite=True / --overwrite to replace it)")
    _check_vocab(vocab, table, "vocabulary")
    if vocab.text_size and (tokenizer is None or tokenizer.size != vocab.text_size):
        raise BundleError(
            "tokenizer",
            f"the vocabulary has {vocab.text_size} text tokens: give its tokenizer (of that size)",
        )
    cfg = model.config
    if cfg.sid_token_offset + vocab.size > cfg.vocab_size or cfg.num_domains < len(vocab.services):
        raise BundleError(
            "model", f"model (vocab_size {cfg.vocab_size}, {cfg.num_domains} domains) does not fit the "
            f"vocabulary ({vocab.size} tokens from offset {cfg.sid_token_offset}, {len(vocab.services)} services)"
        )  # fmt: skip
    aligned = align_catalogue(catalogue, table)
    probes = list(probes) if probes else table_probes(table, vocab)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        working = copy.deepcopy(model).to("cpu", torch.float32).eval()  # the fp32 reference
        reference = _probe_logits(working, probes, vocab)
        working.to(DTYPES[dtype]).save_pretrained(tmp / MODEL_DIR)
        del working
        table.save(tmp / SID_DIR)
        if isinstance(model, MoERecForCausalLM):
            table.trie().save(tmp / SID_DIR / TRIE_FILE)
        pq.write_table(aligned, tmp / CATALOGUE_FILE)
        (tmp / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
        if vocab.text_size:
            tokenizer.save(tmp)
        for p in tmp.rglob("*"):  # some writers create 0600 temp files; a bundle is meant to be shipped
            p.chmod(0o755 if p.is_dir() else 0o644)
        counts = torch.bincount(table.service_index, minlength=len(table.services)).tolist()
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "moe_rec": moe_rec.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "dtype": dtype,
            "model_kind": "item" if isinstance(model, MoERecForItemPrediction) else "token",
            "source": source,
            "config": config,
            "items": {"total": len(table), "per_service": dict(zip(table.services, counts, strict=True))},
            "catalogue_fields": [c for c in aligned.column_names if c not in ("service", "item_id")],
            "files": _file_entries(tmp),
        }
        if privacy is not None:
            manifest["privacy"] = privacy
        _write_manifest(tmp, manifest)
        exported = _probe_logits(load_bundle(tmp).model, probes, vocab)
        result = _compare(reference, exported, dtype)
        if not result["passed"]:
            off = ", ".join(
                f"{k} {result[k]:.3g} (bound {result['tolerance'][k]:.3g})" for k in result["failed"]
            )
            raise BundleError(
                out, f"the reloaded {dtype} model's logits differ from the fp32 model's: {off}; not exported"
            )
        probe_source = next((p["source"] for p in probes if "source" in p), "SID table items")
        manifest["verification"] = {**result, "probes": len(probes), "probe_source": probe_source,
                                    "export_seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
        _write_manifest(tmp, manifest)
        if out.exists():  # overwrite: move the old bundle aside, then the new one in, then drop the old
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_bundle(path: Path | str, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle after checking every file against its manifest.

    Raises:
        BundleError: no manifest, an unsupported format, a missing, changed or unknown file
            (named), or parts that do not fit together.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(root, "no such bundle directory")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.exists():
        raise BundleError(manifest_path, "missing: not a bundle (export one with `moe-rec export`)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        dtype = DTYPES[manifest["dtype"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BundleError(manifest_path, f"unreadable manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(manifest_path, f"unsupported format_version {manifest.get('format_version')!r}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    if missing := sorted(set(files) - present):
        raise BundleError(root / missing[0], "missing from the bundle")
    if unknown := sorted(present - set(files)):
        raise BundleError(root / unknown[0], "unknown file, not listed in the manifest (modified bundle?)")
    for name, entry in sorted(files.items()):
        p = root / name
        if p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            raise BundleError(p, "checksum does not match the manifest (corrupt or modified)")
    try:
        vocab = Vocabulary.from_dict(json.loads((root / VOCAB_FILE).read_text()))
        table = SIDTable.load(root / SID_DIR)
        config = MoERecConfig.from_pretrained(root / MODEL_DIR)
        item_level = model_class(config) is MoERecForItemPrediction
        trie = None if item_level else SIDTrie.load(root / SID_DIR / TRIE_FILE, device=device)
        catalogue = pq.read_table(root / CATALOGUE_FILE)
        tokenizer = TextTokenizer.load(root) if vocab.text_size else None
    except SIDFileError as e:
        raise _wrapped(e, e.path) from None
    except DataError as e:  # the tokenizer file: missing or unreadable
        raise BundleError(root / TOKENIZER_FILE, str(e)) from None
    except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as e:
        raise BundleError(root, f"unreadable bundle part ({type(e).__name__}: {e})") from None
    _check_vocab(vocab, table, root / VOCAB_FILE)
    kind = "item" if item_level else "token"
    if manifest.get("model_kind", "token") != kind:  # bundles before model_kind were all token-level
        raise BundleError(
            manifest_path, f"model_kind {manifest.get('model_kind')!r} but the model config is {kind}-level"
        )
    if trie is not None and (trie.services != table.services or trie.vocab_sizes != table.vocab_sizes):
        raise BundleError(root / SID_DIR / TRIE_FILE, "trie does not match the SID table")
    keys = _item_keys(catalogue.column("service").to_pylist(), catalogue.column("item_id").to_pylist())
    if len(keys) != len(table) or not (keys == _item_keys(_table_services(table), table.item_ids)).all():
        raise BundleError(root / CATALOGUE_FILE, "catalogue rows do not match the SID table's items")
    model = model_class(config).from_pretrained(root / MODEL_DIR, dtype=dtype).to(device).eval()
    if tokenizer is not None and tokenizer.size != vocab.text_size:
        raise BundleError(
            root / TOKENIZER_FILE, f"{tokenizer.size} subwords for {vocab.text_size} text tokens"
        )
    return Bundle(root, model, table, trie, vocab, catalogue, manifest, tokenizer)


def _history_probes(run_dir: Path) -> list[dict[str, Any]]:
    """Up to :data:`PROBES` evaluation prompts of the run's real histories (test, else valid)."""
    for split in ("test", "valid"):
        for shard in sorted((run_dir / "sequences" / split).glob("*.parquet")):
            rows = pq.read_table(shard, columns=["user", "input_ids", "domain_ids"]).slice(0, PROBES)
            return [{**r, "source": f"sequences/{split}/{shard.name}"} for r in rows.to_pylist()]
    return []


def _checkpoint_json(path: Path) -> dict[str, Any]:
    """A JSON file of a checkpoint tag directory; a damaged one is a :class:`BundleError` naming it."""
    other = "export another checkpoint of the run (--tag step_...)"
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(path, f"damaged checkpoint file ({type(e).__name__}: {e}); {other}") from None
    if not isinstance(data, dict):
        raise BundleError(path, f"damaged checkpoint file (not a JSON object); {other}")
    return data


def export_checkpoint(
    checkpoint_dir: Path | str,
    out: Path | str,
    *,
    tag: str = "best",
    dtype: str = "float32",
    run_dir: Path | str | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Consolidate a ZeRO 1/2/3 checkpoint and write it as a verified bundle (:func:`export_model`).

    Args:
        checkpoint_dir: ``<run_dir>/checkpoints``.
        out: the bundle directory.
        tag: ``best``, ``latest`` or a ``step_*`` tag.
        dtype: ``float32`` or ``bfloat16`` weights.
        run_dir: where ``sids/`` (SID table), ``data/`` (catalogue) and ``sequences/`` (probe
            prompts) live; default: the checkpoint directory's parent.
        config: the experiment config to record; default: ``<run_dir>/config.yaml`` if present.
        overwrite: replace an existing bundle at ``out``.
    """
    import yaml

    from moe_rec.data.store import load_items
    from moe_rec.train import checkpoint as ckpt  # DeepSpeed loads only inside consolidate()

    ckpt_dir = Path(checkpoint_dir)
    run_dir = Path(run_dir) if run_dir is not None else ckpt_dir.parent
    if not ckpt_dir.is_dir():
        raise BundleError(ckpt_dir, "checkpoint directory not found (train first, or pass --checkpoint)")
    try:
        tag = ckpt.resolve_tag(ckpt_dir, tag)
        state_file = ckpt_dir / tag / ckpt.STATE_FILE
        world_size = _checkpoint_json(state_file).get("world_size") if state_file.exists() else None
        state = ckpt.verify(ckpt_dir, tag, world_size)
        vocab = Vocabulary.from_dict(_checkpoint_json(ckpt_dir / tag / ckpt.VOCAB_FILE))
        table = SIDTable.load(run_dir / SID_DIR)
        catalogue = load_items(run_dir / "data").data.table
        model = ckpt.load_model(ckpt_dir, tag)
        tokenizer = TextTokenizer.load(run_dir / "sequences") if vocab.text_size else None
    except FileNotFoundError as e:
        raise BundleError(e.filename, "not found") from None
    except (ckpt.CheckpointError, SIDFileError, DataError) as e:
        raise _wrapped(e, getattr(e, "path", None) or getattr(e, "where", None) or ckpt_dir) from None
    if config is None and (run_dir / "config.yaml").exists():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    source = {"checkpoint": str(ckpt_dir.resolve()), "tag": tag, "step": state.get("step")}
    return export_model(
        model, table, vocab, align_catalogue(catalogue, table, run_dir / "data" / "items"), out,
        dtype=dtype, config=config, source=source, probes=_history_probes(run_dir), overwrite=overwrite,
        privacy=state.get("privacy"), tokenizer=tokenizer,
    )  # fmt: skip
