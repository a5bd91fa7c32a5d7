"""The quantiser interface shared by residual k-means, RQ-VAE and (O)PQ, and the pick by config.

A quantiser turns embeddings (N, D) into codes (N, L) with values in ``[0, K)``; the rest of the
stage (dedup, table, trie) sees only this interface. Both kinds save to one checksummed
safetensors file that records its kind, so :func:`load_quantizer` needs no config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from moe_rec.sid.config import SIDConfig
from moe_rec.sid.embed import resolve_device
from moe_rec.sid.io import SIDFileError, load_tensors
from moe_rec.sid.product import ProductQuantizer
from moe_rec.sid.residual_kmeans import ResidualKMeans
from moe_rec.sid.rqvae import RQVAEQuantizer

QUANTIZER_FILE = "quantizer.safetensors"


class Quantizer(Protocol):
    kind: str

    @property
    def levels(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    def encode(self, embeddings: torch.Tensor, chunk_size: int = 65_536) -> torch.Tensor:
        """Codes (N, L) int64 of embeddings (N, D)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstructed embeddings (N, D) of codes (N, L)."""
        ...

    def report(self) -> dict[str, Any]:
        """What fitting measured (JSON-able)."""
        ...

    def save(self, path: Path) -> None: ...


def fit_quantizer(embeddings: torch.Tensor, cfg: SIDConfig) -> Quantizer:
    """Fit the quantiser ``cfg.quantizer`` on ``embeddings`` (N, D)."""
    device = resolve_device(cfg.device)
    common = dict(levels=cfg.levels, codebook_size=cfg.codebook_size, seed=cfg.seed, normalize=cfg.normalize,
                  device=device)  # fmt: skip
    kmeans = dict(iters=cfg.kmeans.iters, init=cfg.kmeans.init, fit_sample=cfg.kmeans.fit_sample,
                  chunk_size=cfg.kmeans.chunk_size)  # fmt: skip
    if cfg.quantizer == "residual_kmeans":
        return ResidualKMeans.fit(embeddings, **common, **kmeans)
    if cfg.quantizer == "rqvae":
        return RQVAEQuantizer.fit(embeddings, **common, cfg=cfg.rqvae, kmeans=cfg.kmeans)
    if cfg.quantizer in ("pq", "opq"):
        opq_iters = cfg.pq.opq_iters if cfg.quantizer == "opq" else 0
        return ProductQuantizer.fit(embeddings, **common, **kmeans, opq_iters=opq_iters)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}; use 'residual_kmeans', 'rqvae', 'pq' or 'opq'")


def load_quantizer(path: Path, device: str = "cpu") -> Quantizer:
    """Load a quantiser saved by either kind (``path`` is the file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / QUANTIZER_FILE
    _, meta = load_tensors(path, "quantiser")
    kinds = {
        ResidualKMeans.kind: ResidualKMeans,
        RQVAEQuantizer.kind: RQVAEQuantizer,
        "pq": ProductQuantizer,
        "opq": ProductQuantizer,
    }
    if meta.get("kind") not in kinds:
        raise SIDFileError(path, f"unknown quantiser kind {meta.get('kind')!r}; known: {sorted(kinds)}")
    return kinds[meta["kind"]].load(path, device=resolve_device(device))
