"""Product quantisation: codes against a float64 brute-force nearest centroid per sub-space, the
OPQ rotation, save / load, and the long-ID SID table it produces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_rec.sid.product import ProductQuantizer
from moe_rec.sid.quantizer import load_quantizer
from moe_rec.sid.table import SIDTable


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g)
    return centres[torch.randint(12, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize(("seed", "levels", "dim"), [(0, 4, 16), (1, 8, 24), (2, 3, 12)])
def test_codes_are_the_nearest_centroid_of_each_sub_space(seed: int, levels: int, dim: int) -> None:
    x = _clustered(400, dim, seed)
    q = ProductQuantizer.fit(x, levels=levels, codebook_size=16, opq_iters=2, seed=seed)
    codes = q.encode(x, chunk_size=64)
    y = (F.normalize(x.double(), dim=1) @ q.rotation.double()).tolist()
    books = q.codebooks.double().tolist()
    width = dim // levels
    for n in range(0, 400, 37):  # a plain loop over sub-spaces and centroids
        for level in range(levels):
            part = y[n][level * width : (level + 1) * width]
            dists = [sum((a - b) ** 2 for a, b in zip(part, c)) for c in books[level]]
            assert dists[int(codes[n, level])] <= min(dists) + 1e-5


def test_opq_rotation_is_orthogonal_and_does_not_increase_the_error() -> None:
    x = _clustered(600, 32, 3) @ torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    pq = ProductQuantizer.fit(x, levels=8, codebook_size=16)
    opq = ProductQuantizer.fit(x, levels=8, codebook_size=16, opq_iters=4)
    eye = torch.eye(32)
    # an fp32 orthogonal matrix (from an SVD) times its transpose: rounding only (measured 2.4e-7)
    torch.testing.assert_close(opq.rotation @ opq.rotation.T, eye, atol=1e-5, rtol=0)
    assert torch.equal(pq.rotation, eye) and pq.kind == "pq" and opq.kind == "opq"
    errors = opq.report()["reconstruction_sq"]
    assert errors[-1] < errors[0]
    recon = opq.decode(opq.encode(x))
    measured = float(((F.normalize(x, dim=1) - recon) ** 2).sum(1).mean())
    assert measured == pytest.approx(errors[-1], rel=1e-4)  # the same fp32 mean, summed in another order


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = _clustered(300, 16, 5)
    q = ProductQuantizer.fit(x, levels=4, codebook_size=8, opq_iters=1)
    q.save(tmp_path / "quantizer.safetensors")
    loaded = load_quantizer(tmp_path)
    assert isinstance(loaded, ProductQuantizer) and loaded.kind == "opq"
    assert torch.equal(loaded.encode(x), q.encode(x))


def test_levels_must_divide_the_embedding() -> None:
    with pytest.raises(ValueError, match="divide 30"):
        ProductQuantizer.fit(torch.randn(50, 30), levels=4, codebook_size=4)


def test_long_ids_make_a_table_without_a_trie() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(256, (40, 17), generator=g)  # 16 codes of 256 + dedup: no int64 packing
    services = ["a"] * 20 + ["b"] * 20
    table = SIDTable(
        services=services, item_ids=[str(i) for i in range(40)], codes=codes, codebook_size=256, max_dedup=256
    )
    assert not table.packable
    rows = table.rows_for_codes(["b", "a", "a"], torch.stack([codes[25], codes[3], codes[25]]))
    assert rows.tolist() == [25, 3, -1]  # item 25 is b's, not a's
    with pytest.raises(ValueError, match="exactly by the item-level model"):
        table.trie()
    dup = codes.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="share a full semantic ID"):
        SIDTable(services=["a"] * 40, item_ids=[str(i) for i in range(40)], codes=dup, codebook_size=256,
                 max_dedup=256)  # fmt: skip


def test_a_product_quantiser_file_without_its_tensors_is_a_file_error(tmp_path: Path) -> None:
    from moe_rec.sid.io import SIDFileError, save_tensors

    save_tensors(
        tmp_path / "quantizer.safetensors",
        {"codebooks": torch.zeros(2, 4, 3)},
        {"kind": "pq", "normalize": True},
    )
    with pytest.raises(SIDFileError, match="rotation"):
        load_quantizer(tmp_path)
