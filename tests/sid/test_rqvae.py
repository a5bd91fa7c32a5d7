"""RQ-VAE quantiser: determinism, dead-code restarts, training signal and save/load."""

from __future__ import annotations

import torch

from moe_rec.sid.config import KMeansConfig, RQVAEConfig
from moe_rec.sid.rqvae import RQVAE, RQVAEQuantizer

SMALL = RQVAEConfig(latent_dim=8, hidden_dims=[32], epochs=4, batch_size=100, lr=3e-3, dead_code_steps=50)
KMEANS = KMeansConfig(iters=5)


def fit(x: torch.Tensor, seed: int, cfg: RQVAEConfig = SMALL, model: RQVAE | None = None) -> RQVAEQuantizer:
    return RQVAEQuantizer.fit(x, levels=2, codebook_size=8, cfg=cfg, kmeans=KMEANS, seed=seed, model=model)


def test_same_seed_same_codes_other_seed_differs(clustered: torch.Tensor) -> None:
    a, b, c = fit(clustered, 0), fit(clustered, 0), fit(clustered, 1)
    assert torch.equal(a.encode(clustered), b.encode(clustered))
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a.encode(clustered), c.encode(clustered))


def test_training_lowers_reconstruction_error(clustered: torch.Tensor) -> None:
    short = fit(clustered, 0, RQVAEConfig(**{**SMALL.__dict__, "epochs": 1}))
    long = fit(clustered, 0, RQVAEConfig(**{**SMALL.__dict__, "epochs": 30}))
    assert long.report()["recon_mse"] < short.report()["recon_mse"]
    assert len(long.report()["codes_used"]) == 2


def _model_with_far_codes(x: torch.Tensor) -> RQVAE:
    """A model whose level-1 codes 4..7 sit far from every latent, so nothing ever picks them."""
    torch.manual_seed(0)
    model = RQVAE(input_dim=x.shape[1], latent_dim=8, hidden_dims=[32], levels=2, codebook_size=8)
    with torch.no_grad():
        latents = model.encoder(torch.nn.functional.normalize(x, dim=1))
        model.codebooks[0, :4] = latents[:4]
        model.codebooks[0, 4:] = 1e3
        model.codebooks[1] = latents[4:12] - latents[:1]
    return model


def test_dead_codes_are_restarted_and_then_used(clustered: torch.Tensor) -> None:
    cfg = RQVAEConfig(**{**SMALL.__dict__, "dead_code_steps": 3, "epochs": 3})  # 18 steps
    revived = fit(clustered, 0, cfg, model=_model_with_far_codes(clustered))
    assert revived.report()["restarts"][0] >= 4
    assert revived.model.codebooks[0, 4:].abs().max() < 100  # moved onto residuals
    assert revived.report()["codes_used"][0] > 4

    never = RQVAEConfig(**{**cfg.__dict__, "dead_code_steps": 10**6})
    control = fit(clustered, 0, never, model=_model_with_far_codes(clustered))
    assert control.report()["restarts"] == [0, 0]
    assert control.report()["codes_used"][0] <= 4


def test_save_load_round_trip(clustered: torch.Tensor, tmp_path) -> None:
    q = fit(clustered, 0)
    q.save(tmp_path / "rq.safetensors")
    loaded = RQVAEQuantizer.load(tmp_path / "rq.safetensors")
    assert torch.equal(loaded.encode(clustered), q.encode(clustered))
    torch.testing.assert_close(loaded.decode(q.encode(clustered)), q.decode(q.encode(clustered)))
