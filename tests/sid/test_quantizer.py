"""Both quantisers behind one interface: fit by config, save, load by kind."""

from __future__ import annotations

import pytest
import torch

from moe_rec.sid.config import KMeansConfig, RQVAEConfig, SIDConfig
from moe_rec.sid.io import SIDFileError, save_tensors
from moe_rec.sid.quantizer import fit_quantizer, load_quantizer


@pytest.mark.parametrize("kind", ["residual_kmeans", "rqvae"])
def test_fit_save_load_by_kind(kind: str, clustered: torch.Tensor, tmp_path) -> None:
    cfg = SIDConfig(
        quantizer=kind,
        levels=2,
        codebook_size=8,
        kmeans=KMeansConfig(iters=5),
        rqvae=RQVAEConfig(latent_dim=8, hidden_dims=[16], epochs=2, batch_size=128),
    )
    q = fit_quantizer(clustered, cfg)
    codes = q.encode(clustered)
    assert codes.shape == (600, 2) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8
    q.save(tmp_path / "quantizer.safetensors")
    loaded = load_quantizer(tmp_path)
    assert loaded.kind == kind
    assert torch.equal(loaded.encode(clustered), codes)


def test_unknown_kind_is_a_file_error(tmp_path) -> None:
    save_tensors(tmp_path / "quantizer.safetensors", {"x": torch.zeros(1)}, {"kind": "lsh"})
    with pytest.raises(SIDFileError, match="unknown quantiser kind 'lsh'"):
        load_quantizer(tmp_path)
