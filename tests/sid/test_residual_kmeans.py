"""Residual k-means against a plain float64 NumPy Lloyd, and its quality and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_rec.sid.residual_kmeans import ResidualKMeans, init_centroids, kmeans, lloyd, nearest


def numpy_lloyd(x: np.ndarray, centroids: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd in float64 with the same stopping and empty-cluster rules as the torch one."""
    x, c = x.astype(np.float64), centroids.astype(np.float64)

    def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        return d.argmin(1), d.min(1)

    codes, dist = assign(c)
    for _ in range(iters):
        new = c.copy()
        empty = []
        for k in range(len(c)):
            members = codes == k
            if members.any():
                new[k] = x[members].mean(0)
            else:
                empty.append(k)
        far = np.argsort(-dist, kind="stable")[: len(empty)]
        new[empty] = x[far]
        c = new
        new_codes, dist = assign(c)
        if (new_codes == codes).all():
            break
        codes = new_codes
    return c, codes


def test_lloyd_matches_numpy_reference(clustered: torch.Tensor) -> None:
    x = clustered[::7]  # 86 points
    start = init_centroids(x, 6, "kmeans++", torch.Generator().manual_seed(3))
    ours, codes, _ = lloyd(x, start, iters=30, chunk_size=16)
    ref, ref_codes = numpy_lloyd(x.numpy(), start.numpy(), iters=30)
    # fp32 centroids (means of a few dozen points of order 10) against float64: fp32 rounding only
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(codes, torch.from_numpy(ref_codes))


def test_empty_cluster_is_reseeded_like_the_reference(clustered: torch.Tensor) -> None:
    x = clustered[:200]
    start = x[:5].clone()
    start[1] = 1e3  # no point is near it: empty after the first assignment
    start[3] = -1e3
    ours, codes, _ = lloyd(x, start, iters=1)
    ref, _ = numpy_lloyd(x.numpy(), start.numpy(), iters=1)
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), atol=1e-5, rtol=1e-5)  # as above
    assert ours.abs().max() < 100  # both far centroids moved onto data points
    _, codes, _ = lloyd(x, start, iters=10)
    assert torch.bincount(codes, minlength=5).min() > 0


def test_nearest_is_exact_in_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(301, 8, generator=g), torch.randn(17, 8, generator=g)
    codes, dist = nearest(x, c, chunk_size=50)
    brute = torch.cdist(x.double(), c.double()) ** 2
    assert torch.equal(codes, brute.argmin(1))
    # fp32 |x|^2 - 2 x.c + |c|^2 cancels: squared distances of order 20 lose ~1e-6 each (measured 4e-6)
    torch.testing.assert_close(dist.double(), brute.min(1).values, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_same_seed_same_codes_other_seed_differs(clustered: torch.Tensor, init: str) -> None:
    def fit(seed: int) -> torch.Tensor:
        q = ResidualKMeans.fit(clustered, levels=3, codebook_size=16, iters=10, init=init, seed=seed)
        return q.encode(clustered)

    a, b, c = fit(0), fit(0), fit(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_error_decreases_with_levels_and_beats_random_codebooks(clustered: torch.Tensor) -> None:
    x = F.normalize(clustered, dim=1)
    q = ResidualKMeans.fit(clustered, levels=3, codebook_size=8, iters=25, seed=0)
    codes = q.encode(clustered)
    errors = []
    for level in range(1, 4):
        partial = ResidualKMeans(q.codebooks[:level], normalize=True)
        errors.append(float(((x - partial.decode(codes[:, :level])) ** 2).sum(1).mean()))
    assert errors[0] > errors[1] > errors[2]

    random_points = ResidualKMeans.fit(clustered, levels=3, codebook_size=8, iters=0, init="random", seed=0)
    noise = ResidualKMeans(F.normalize(torch.randn(3, 8, x.shape[1]), dim=2) * 0.5, normalize=True)
    for baseline in (random_points, noise):
        base_error = float(((x - baseline.decode(baseline.encode(clustered))) ** 2).sum(1).mean())
        assert errors[2] < base_error


def test_fit_sample_and_chunked_assignment(clustered: torch.Tensor) -> None:
    q = ResidualKMeans.fit(clustered, levels=2, codebook_size=8, iters=10, fit_sample=100, seed=0)
    assert q.report()["fit_items"] == 100
    assert torch.equal(q.encode(clustered, chunk_size=37), q.encode(clustered, chunk_size=10_000))
    assert len(torch.unique(q.encode(clustered)[:, 0])) > 4


def test_kmeans_with_fewer_points_than_codes() -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    centroids, codes = kmeans(x, 8, iters=5, init="kmeans++", generator=torch.Generator().manual_seed(0))
    assert centroids.shape == (8, 4)
    torch.testing.assert_close(centroids[codes], x)  # every point is its own centroid


def test_save_load_round_trip(clustered: torch.Tensor, tmp_path) -> None:
    q = ResidualKMeans.fit(clustered, levels=2, codebook_size=8, iters=5, seed=0)
    q.save(tmp_path / "q.safetensors")
    loaded = ResidualKMeans.load(tmp_path / "q.safetensors")
    assert torch.equal(loaded.encode(clustered), q.encode(clustered))
    assert loaded.report() == q.report()
