"""The semantic-ID table: ``(service, item_id)`` <-> codes ``(c_1..c_L, dedup)``, both ways.

Sequence building turns millions of events into codes, and decoding turns generated codes back
into items, so both lookups are vectorised: item keys are a sorted NumPy string array searched
with ``searchsorted``; full IDs are packed into sorted int64 keys (service first, see
:mod:`moe_rec.sid.trie`). An unknown item or service is an error that names it, never a silent
default.

On disk (``save(dir)``)::

    <dir>/sid_table.parquet   service, item_id, codes (fixed-size list of L+1 int32), in row order
    <dir>/sid_table.json      levels, codebook size, dedup size, services, quantiser, encoder,
                              item count and the sha256 of the Parquet file
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe_rec.data.vocab import Vocabulary
from moe_rec.errors import MoeRecError
from moe_rec.sid.dedup import assign_dedup
from moe_rec.sid.io import SIDFileError, atomic_path, read_json, sha256_file, write_json
from moe_rec.sid.trie import SIDTrie, UnknownServiceError, fits_int64, in_range, pack_codes

TABLE_FILE = "sid_table.parquet"
META_FILE = "sid_table.json"
FORMAT_VERSION = 1
_SEP = "\x1f"  # joins service and item id into one lookup key; not allowed in service names


class UnknownItemError(MoeRecError, LookupError):
    """An item that is not in the semantic-ID table."""


class SIDTable:
    """Every item's semantic ID.

    Args:
        services: (N,) service of each item.
        item_ids: (N,) item id of each item; ``(service, item_id)`` must be unique.
        codes: (N, L+1) int64, quantiser codes then the dedup code; full IDs unique per service.
        codebook_size: K, range of the first L codes.
        max_dedup: range of the dedup code.
        quantizer: which quantiser made the codes (recorded in the metadata).
        encoder: which text encoder made the embeddings (recorded in the metadata).
    """

    def __init__(
        self,
        *,
        services: Sequence[str],
        item_ids: Sequence[str],
        codes: torch.Tensor,
        codebook_size: int,
        max_dedup: int,
        quantizer: str = "",
        encoder: str = "",
    ) -> None:
        n = len(item_ids)
        if codes.ndim != 2 or codes.shape[0] != n or len(services) != n:
            raise ValueError(
                f"{len(services)} services, {n} item ids and codes {tuple(codes.shape)} do not fit"
            )
        service_arr = np.asarray(services, dtype=str).reshape(n)
        self.services: list[str] = sorted(set(service_arr.tolist()))
        if any(_SEP in s for s in self.services):
            raise ValueError("service names must not contain the \\x1f character")
        self.item_ids = np.asarray(item_ids, dtype=str).reshape(n)
        self.codes = codes.detach().cpu().long()
        self.codebook_size, self.max_dedup = int(codebook_size), int(max_dedup)
        self.quantizer, self.encoder = quantizer, encoder
        self.service_index = torch.from_numpy(
            np.searchsorted(np.asarray(self.services, dtype=str), service_arr).astype(np.int64)
        )
        self._service_pos = {s: i for i, s in enumerate(self.services)}

        if not bool(in_range(self.codes, self.vocab_sizes).all()):
            raise ValueError(f"codes outside the ranges {self.vocab_sizes}")
        self.packable = fits_int64(self._radices)  # full IDs pack into one int64 (beam-search tries)
        item_keys = np.char.add(np.char.add(service_arr, _SEP), self.item_ids)
        self._item_order = np.argsort(item_keys, kind="stable")
        self._item_keys = item_keys[self._item_order]
        if n > 1 and (dup := np.nonzero(self._item_keys[1:] == self._item_keys[:-1])[0]).size:
            service, item = str(self._item_keys[dup[0]]).split(_SEP, 1)
            raise ValueError(
                f"item {item!r} of service {service!r} appears {dup.size + 1}+ times; ids must be unique"
            )
        digits = torch.cat([self.service_index[:, None], self.codes], 1)  # (N, 1 + L + 1)
        if n > 1 and torch.unique(digits, dim=0).shape[0] < n:
            raise ValueError(
                "two items of one service share a full semantic ID; run dedup before building the table"
            )
        if self.packable:
            id_keys = pack_codes(digits, self._radices)
            self._id_order = torch.argsort(id_keys, stable=True)
            self._id_keys = id_keys[self._id_order]
        else:  # long IDs (product quantisation): look full IDs up by their digit tuples
            self._id_rows = {tuple(d): i for i, d in enumerate(digits.tolist())}

    @classmethod
    def from_quantized(
        cls,
        *,
        services: Sequence[str],
        item_ids: Sequence[str],
        codes: torch.Tensor,
        codebook_size: int,
        max_dedup: int,
        quantizer: str = "",
        encoder: str = "",
    ) -> SIDTable:
        """The table of quantiser codes (N, L): appends each item's dedup code (:func:`assign_dedup`)."""
        dedup = assign_dedup(services, item_ids, codes, max_dedup)  # (N,)
        return cls(
            services=services,
            item_ids=item_ids,
            codes=torch.cat([codes.long(), dedup[:, None]], 1),
            codebook_size=codebook_size,
            max_dedup=max_dedup,
            quantizer=quantizer,
            encoder=encoder,
        )

    @property
    def levels(self) -> int:
        """L, quantiser codes per item (the dedup code not counted)."""
        return self.codes.shape[1] - 1

    @property
    def vocab_sizes(self) -> list[int]:
        """Range of each code position: ``[K] * L + [max_dedup]``."""
        return [self.codebook_size] * (self.codes.shape[1] - 1) + [self.max_dedup]

    @property
    def _radices(self) -> list[int]:
        return [max(len(self.services), 1), *self.vocab_sizes]

    def __len__(self) -> int:
        return len(self.item_ids)

    def _service_indices(self, service: str | Sequence[str], batch: int) -> torch.Tensor:
        names = [service] * batch if isinstance(service, str) else list(service)
        if len(names) != batch:
            raise ValueError(f"{len(names)} services for a batch of {batch}")
        try:
            return torch.tensor([self._service_pos[s] for s in names], dtype=torch.long)
        except KeyError as e:
            raise UnknownServiceError(f"unknown service {e.args[0]!r}; known: {self.services}") from None

    def rows(self, service: str | Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """Table rows (B,) of items, given one service for all or one per item.

        Raises:
            UnknownServiceError, UnknownItemError: naming the first few unknown keys.
        """
        ids = np.asarray(item_ids, dtype=str).reshape(-1)
        services = np.full(len(ids), service) if isinstance(service, str) else np.asarray(service, dtype=str)
        if services.shape != ids.shape:
            raise ValueError(f"{len(services)} services for {len(ids)} item ids")
        if unknown := sorted(set(np.unique(services).tolist()) - set(self._service_pos)):
            raise UnknownServiceError(f"unknown services {unknown}; known: {self.services}")
        keys = np.char.add(np.char.add(services, _SEP), ids)
        pos = np.searchsorted(self._item_keys, keys).clip(max=max(len(self._item_keys) - 1, 0))
        found = self._item_keys[pos] == keys if len(self._item_keys) else np.zeros(len(keys), dtype=bool)
        if not found.all():
            missing = [tuple(str(k).split(_SEP, 1)) for k in keys[~found][:5]]
            raise UnknownItemError(
                f"{int((~found).sum())} unknown (service, item_id) pairs, e.g. {missing}; "
                "the SID table holds only items of the catalogue it was built from"
            )
        return self._item_order[pos]

    def codes_for(self, service: str | Sequence[str], item_ids: Sequence[str]) -> torch.Tensor:
        """Full IDs (B, L+1) of items (one service for all, or one per item)."""
        return self.codes[torch.from_numpy(self.rows(service, item_ids))]

    def rows_for_codes(self, service: str | Sequence[str], codes: torch.Tensor) -> torch.Tensor:
        """Table rows (B,) of full IDs ``codes`` (B, L+1); -1 where no item has that ID."""
        codes = codes.cpu().long()
        digits = torch.cat([self._service_indices(service, codes.shape[0])[:, None], codes], 1)
        if not self.packable:
            return torch.tensor([self._id_rows.get(tuple(d), -1) for d in digits.tolist()], dtype=torch.long)
        ok = in_range(digits, self._radices)
        key = pack_codes(torch.where(ok[:, None], digits, 0), self._radices)
        pos = torch.searchsorted(self._id_keys, key).clamp_max(max(len(self) - 1, 0))
        hit = ok & (self._id_keys[pos] == key) if len(self) else torch.zeros_like(ok)
        return torch.where(hit, self._id_order[pos], -1)

    def item_ids_for(self, service: str | Sequence[str], codes: torch.Tensor) -> list[str]:
        """Item ids of full IDs ``codes`` (B, L+1); raises :class:`UnknownItemError` for an ID no item has."""
        rows = self.rows_for_codes(service, codes)
        if bool((rows < 0).any()):
            bad = codes[rows < 0][:5].tolist()
            raise UnknownItemError(f"{int((rows < 0).sum())} codes name no item, e.g. {bad}")
        return self.item_ids[rows.numpy()].tolist()

    def vocabulary(self) -> Vocabulary:
        """The token layout for this table: its services, L levels of K codes, the dedup range."""
        return Vocabulary(
            services=tuple(self.services),
            levels=self.levels,
            codebook_size=self.codebook_size,
            dedup_size=self.max_dedup,
        )

    def code_map(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """``(service, item_id) -> (c1..cL, dedup)`` for every item, as a plain dict (sequence building)."""
        services = np.asarray(self.services)[self.service_index.numpy()].tolist()
        return dict(
            zip(
                zip(services, self.item_ids.tolist(), strict=True),
                map(tuple, self.codes.tolist()),
                strict=True,
            )
        )

    def trie(self) -> SIDTrie:
        """The tensor trie of this table's IDs (for beam search; needs IDs that pack into int64)."""
        if not self.packable:
            raise ValueError(
                f"IDs of {self.levels} codes of {self.codebook_size} do not fit the beam-search trie "
                "(int64 prefixes); long IDs are scored exactly by the item-level model (model.kind=item)"
            )
        return SIDTrie.build(self.services, self.service_index, self.codes, self.vocab_sizes)

    def metadata(self) -> dict[str, Any]:
        counts = torch.bincount(self.service_index, minlength=len(self.services)).tolist()
        return {
            "format_version": FORMAT_VERSION,
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "dedup_size": self.max_dedup,
            "services": self.services,
            "items": len(self),
            "items_per_service": dict(zip(self.services, counts, strict=True)),
            "quantizer": self.quantizer,
            "encoder": self.encoder,
        }

    def to_arrow(self) -> pa.Table:
        width = self.codes.shape[1]
        flat = pa.array(self.codes.to(torch.int32).flatten().numpy())
        return pa.table(
            {
                "service": pa.array(
                    np.asarray(self.services)[self.service_index.numpy()].tolist(), pa.string()
                ),
                "item_id": pa.array(self.item_ids.tolist(), pa.string()),
                "codes": pa.FixedSizeListArray.from_arrays(flat, width),
            }
        )

    def save(self, out_dir: Path) -> None:
        """Write ``sid_table.parquet`` and ``sid_table.json`` into ``out_dir`` (atomically each)."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir / TABLE_FILE) as tmp:
            pq.write_table(self.to_arrow(), tmp)
        write_json(out_dir / META_FILE, {**self.metadata(), "sha256": sha256_file(out_dir / TABLE_FILE)})

    @classmethod
    def load(cls, out_dir: Path) -> SIDTable:
        """Read a table written by :meth:`save`; a missing, changed or unreadable file is a :class:`SIDFileError`."""
        out_dir = Path(out_dir)
        meta = read_json(out_dir / META_FILE, "SID table metadata")
        path = out_dir / TABLE_FILE
        if not path.exists():
            raise SIDFileError(path, "SID table not found")
        if meta.get("format_version") != FORMAT_VERSION:
            raise SIDFileError(
                out_dir / META_FILE, f"unsupported format_version {meta.get('format_version')!r}"
            )
        if sha256_file(path) != meta.get("sha256"):
            raise SIDFileError(
                path, "SID table does not match the checksum in its metadata (corrupt or replaced)"
            )
        try:
            table = pq.read_table(path)
            width = meta["levels"] + 1
            codes = table.column("codes").combine_chunks().flatten().to_numpy().reshape(-1, width)
            return cls(
                services=table.column("service").to_pylist(),
                item_ids=table.column("item_id").to_pylist(),
                codes=torch.from_numpy(codes.astype(np.int64)),
                codebook_size=meta["codebook_size"],
                max_dedup=meta["dedup_size"],
                quantizer=meta.get("quantizer", ""),
                encoder=meta.get("encoder", ""),
            )
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise SIDFileError(path, f"SID table is unreadable ({e}); rebuild it") from None
