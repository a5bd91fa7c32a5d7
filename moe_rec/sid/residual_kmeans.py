"""Residual k-means, the default quantiser: L levels of K centroids, each fitted on what the
previous levels left over.

Level 1 clusters the (L2-normalised) embeddings; level l clusters the residuals ``x - c_1 - ... -
c_{l-1}``. An item's codes are its nearest centroid per level, so similar items share a prefix and
the sum of its centroids approximates its embedding. Centroids are fitted on at most
``fit_sample`` items (Lloyd's algorithm, k-means++ or random init) and then every item is
assigned in chunks of ``chunk_size`` rows, so 1M x 384 needs memory for one (chunk, K) distance
block, not (N, K). Everything random draws from one seeded ``torch.Generator``: same seed, same
codes (on one device). A centroid left without items is re-seeded on the items farthest from
their centroid, which needs no randomness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from moe_rec.sid.io import SIDFileError, load_tensors, save_tensors

Init = Literal["kmeans++", "random"]


def nearest(
    x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row (first one on ties), in chunks of ``chunk_size`` rows.

    Args:
        x: (N, D) points.
        centroids: (K, D).
    Returns:
        codes (N,) int64 and squared distances (N,) float32.
    """
    c_sq = (centroids * centroids).sum(1)  # (K,)
    codes, dist = [], []
    for chunk in x.split(chunk_size):
        d = torch.addmm(
            c_sq, chunk, centroids.T, alpha=-2
        )  # (n, K) = |c|^2 - 2 x.c; |x|^2 added after argmin
        best, idx = d.min(1)
        codes.append(idx)
        dist.append((best + (chunk * chunk).sum(1)).clamp_min_(0))
    return torch.cat(codes), torch.cat(dist)


def init_centroids(x: torch.Tensor, k: int, method: Init, generator: torch.Generator) -> torch.Tensor:
    """``k`` starting centroids (k, D) drawn from the rows of ``x`` (N, D).

    ``random``: k distinct rows (with repeats only when N < k). ``kmeans++``: each next centroid
    is a row drawn with probability proportional to its squared distance to the nearest chosen
    one (uniform when all distances are zero).
    """
    n = x.shape[0]
    if method == "random":
        if n >= k:
            return x[torch.randperm(n, generator=generator, device=x.device)[:k]].clone()
        return x[torch.randint(n, (k,), generator=generator, device=x.device)].clone()
    if method != "kmeans++":
        raise ValueError(f"unknown k-means init {method!r}; use 'kmeans++' or 'random'")
    x_sq = (x * x).sum(1)  # (N,)
    chosen = [int(torch.randint(n, (1,), generator=generator, device=x.device))]
    d2 = torch.addmv(x_sq + x_sq[chosen[0]], x, x[chosen[0]], alpha=-2).clamp_min_(
        0
    )  # (N,) to nearest chosen
    for _ in range(1, k):
        cdf = d2.double().cumsum(0)
        u = torch.rand(1, generator=generator, device=x.device, dtype=torch.float64)
        if cdf[-1] > 0:
            i = int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max_(n - 1))
        else:
            i = int(u * n)
        chosen.append(i)
        d2 = torch.minimum(d2, torch.addmv(x_sq + x_sq[i], x, x[i], alpha=-2).clamp_min_(0))
    return x[chosen].clone()


def update_centroids(
    x: torch.Tensor,
    codes: torch.Tensor,
    dist: torch.Tensor,
    centroids: torch.Tensor,
    chunk_size: int = 65_536,
) -> torch.Tensor:
    """One Lloyd update: every centroid moves to the mean of its rows (summed in float64).

    A centroid with no rows is re-seeded on a row farthest from its own centroid (the j-th empty
    centroid, in index order, takes the j-th farthest row).

    Args:
        x: (N, D); codes: (N,) current assignment; dist: (N,) squared distance to it;
        centroids: (K, D) current centroids.
    Returns:
        (K, D) new centroids, dtype of ``x``.
    """
    k = centroids.shape[0]
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for xs, cs in zip(x.split(chunk_size), codes.split(chunk_size), strict=True):
        sums.index_add_(0, cs, xs.double())
    counts = torch.bincount(codes, minlength=k)  # (K,)
    new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids.double()).to(
        x.dtype
    )
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        far = torch.argsort(dist, descending=True, stable=True)[: len(empty)]
        new[empty[: len(far)]] = x[far]
    return new


def lloyd(
    x: torch.Tensor, centroids: torch.Tensor, iters: int, chunk_size: int = 65_536
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's algorithm from ``centroids`` (K, D) on ``x`` (N, D) for at most ``iters`` updates,
    stopping early once the assignment no longer changes.

    Returns:
        centroids (K, D), codes (N,) int64 (nearest returned centroid), updates run.
    """
    codes, dist = nearest(x, centroids, chunk_size)
    updates = 0
    while updates < iters:
        centroids = update_centroids(x, codes, dist, centroids, chunk_size)
        updates += 1
        new_codes, dist = nearest(x, centroids, chunk_size)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    return centroids, codes, updates


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int,
    init: Init,
    generator: torch.Generator,
    chunk_size: int = 65_536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``x`` (N, D): centroids (k, D) and codes (N,)."""
    centroids, codes, _ = lloyd(x, init_centroids(x, k, init, generator), iters, chunk_size)
    return centroids, codes


class ResidualKMeans:
    """Fitted residual k-means: ``codebooks`` (L, K, D) plus whether inputs are L2-normalised first."""

    kind = "residual_kmeans"

    def __init__(
        self, codebooks: torch.Tensor, *, normalize: bool, report: dict[str, Any] | None = None
    ) -> None:
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be (L, K, D), got {tuple(codebooks.shape)}")
        self.codebooks = codebooks
        self.normalize = normalize
        self._report = report or {}

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[2]

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        *,
        levels: int,
        codebook_size: int,
        iters: int = 25,
        init: Init = "kmeans++",
        fit_sample: int = 200_000,
        seed: int = 0,
        chunk_size: int = 65_536,
        normalize: bool = True,
        device: str = "cpu",
    ) -> ResidualKMeans:
        """Fit L levels of K centroids on at most ``fit_sample`` rows of ``embeddings`` (N, D)."""
        generator = torch.Generator(device=device).manual_seed(seed)
        n = embeddings.shape[0]
        if n > fit_sample:
            rows = torch.randperm(n, generator=generator, device=device)[:fit_sample].sort().values
            x = embeddings[rows.cpu()]
        else:
            x = embeddings
        residual = _prepare(x, normalize, device)
        codebooks, per_level = [], []
        for _ in range(levels):
            start = init_centroids(residual, codebook_size, init, generator)
            centroids, codes, updates = lloyd(residual, start, iters, chunk_size)
            residual -= centroids[codes]
            codebooks.append(centroids)
            per_level.append(
                {
                    "lloyd_updates": updates,
                    "codes_used": int(torch.unique(codes).numel()),
                    "residual_sq": float((residual * residual).sum(1).mean()),  # after this level
                }
            )
        report = {"fit_items": int(residual.shape[0]), "levels": per_level}
        return cls(torch.stack(codebooks), normalize=normalize, report=report)

    def encode(self, embeddings: torch.Tensor, chunk_size: int = 65_536) -> torch.Tensor:
        """Codes (N, L) int64 of ``embeddings`` (N, D), assigned level by level in chunks."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings (N, {self.dim}), got {tuple(embeddings.shape)}")
        device = self.codebooks.device
        out = []
        for chunk in embeddings.split(chunk_size):
            residual = _prepare(chunk, self.normalize, device)
            codes = []
            for level in self.codebooks:
                idx, _ = nearest(residual, level, chunk_size)
                residual -= level[idx]
                codes.append(idx)
            out.append(torch.stack(codes, 1).cpu())
        return torch.cat(out)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction (N, D): the sum of each item's centroids (in the normalised space)."""
        levels = torch.arange(self.levels, device=self.codebooks.device)
        return self.codebooks[levels, codes.to(self.codebooks.device)].sum(1)  # (N, L, D) -> (N, D)

    def report(self) -> dict[str, Any]:
        """What fitting measured: items fitted on, and per level the Lloyd updates, codes used and
        the mean squared residual left after it."""
        return dict(self._report)

    def save(self, path: Path) -> None:
        meta = {"kind": self.kind, "normalize": self.normalize, "report": self._report}
        save_tensors(path, {"codebooks": self.codebooks}, meta)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> ResidualKMeans:
        tensors, meta = load_tensors(path, "quantiser")
        if meta.get("kind") != cls.kind:
            raise SIDFileError(path, f"holds a {meta.get('kind')!r} quantiser, not {cls.kind!r}")
        return cls(tensors["codebooks"].to(device), normalize=meta["normalize"], report=meta.get("report"))


def _prepare(x: torch.Tensor, normalize: bool, device: str | torch.device) -> torch.Tensor:
    """A fresh float32 copy of ``x`` on ``device`` (safe to modify in place), L2-normalised when asked."""
    x = x.to(device=device, dtype=torch.float32)
    return F.normalize(x, dim=1) if normalize else x.clone()
