"""RQ-VAE quantiser: an MLP auto-encoder whose latent is written as L residual codebook codes.

The alternative to residual k-means (TIGER, Rajput et al. 2023). The encoder maps an embedding
to a small latent ``z``; level l picks the code nearest to the residual ``r_l = z - e_1 - ... -
e_{l-1}``; the decoder reconstructs the embedding from ``e_1 + ... + e_L``. Gradients pass the
quantiser with the straight-through estimator. Loss per batch::

    mse(decoder(z_q), x) + sum_l [ mse(e_l, sg(r_l)) + commitment * mse(r_l, sg(e_l)) ]

Codebooks start as residual k-means of the latents of the untrained encoder. A code unused for
``dead_code_steps`` consecutive steps is restarted on a random residual of the current batch at its
level (its optimiser state is cleared), which keeps the codebooks in use. Everything random
(initial weights, batch order, restarts) follows the seed, so a CPU run is reproducible.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.console import progress
from moe_rec.sid.config import KMeansConfig, RQVAEConfig
from moe_rec.sid.io import SIDFileError, load_tensors, save_tensors
from moe_rec.sid.residual_kmeans import ResidualKMeans, nearest


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, D) decoded embedding
    codes: torch.Tensor  # (B, L) int64
    residuals: torch.Tensor  # (L, B, latent) residual each level quantised (detached)
    recon_loss: torch.Tensor  # scalar
    vq_loss: torch.Tensor  # scalar: codebook + commitment terms summed over levels


class RQVAE(nn.Module):
    """Encoder MLP -> L residual codebooks (L, K, latent) -> decoder MLP (mirror of the encoder)."""

    def __init__(
        self, *, input_dim: int, latent_dim: int, hidden_dims: list[int], levels: int, codebook_size: int
    ) -> None:
        super().__init__()
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.hidden_dims = list(hidden_dims)
        self.encoder = _mlp([input_dim, *hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), input_dim])
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent_dim) * 0.01)

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual quantisation of latents ``z`` (B, latent).

        Returns:
            codes (B, L), chosen code vectors (L, B, latent) with gradients to the codebooks, and
            the residuals (L, B, latent) each level quantised (with gradients to the encoder).
        """
        residual, codes, chosen, residuals = z, [], [], []
        for level in self.codebooks:  # (K, latent)
            idx, _ = nearest(residual.detach(), level.detach())
            e = level[idx]  # (B, latent)
            codes.append(idx)
            chosen.append(e)
            residuals.append(residual)
            residual = residual - e.detach()
        return torch.stack(codes, 1), torch.stack(chosen), torch.stack(residuals)

    def forward(self, x: torch.Tensor, commitment: float = 0.25) -> RQVAEOutput:
        """x: (B, D) embeddings."""
        z = self.encoder(x)  # (B, latent)
        codes, chosen, residuals = self.quantize(z)
        codebook_loss = F.mse_loss(chosen, residuals.detach(), reduction="none").mean((1, 2)).sum()
        commit_loss = F.mse_loss(residuals, chosen.detach(), reduction="none").mean((1, 2)).sum()
        z_q = chosen.sum(0)  # (B, latent)
        z_st = z + (z_q - z).detach()  # straight-through: forward z_q, backward identity to z
        recon = self.decoder(z_st)
        return RQVAEOutput(
            recon=recon,
            codes=codes,
            residuals=residuals.detach(),
            recon_loss=F.mse_loss(recon, x),
            vq_loss=codebook_loss + commitment * commit_loss,
        )


class DeadCodeTracker:
    """Steps since each code (L, K) was last chosen; restarts codes idle for ``patience`` steps."""

    def __init__(self, levels: int, codebook_size: int, patience: int, device: torch.device) -> None:
        self.idle = torch.zeros(levels, codebook_size, dtype=torch.long, device=device)
        self.patience = patience
        self.restarts = torch.zeros(levels, dtype=torch.long)

    @torch.no_grad()
    def step(
        self,
        codes: torch.Tensor,
        residuals: torch.Tensor,
        codebooks: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> None:
        """Count one step of ``codes`` (B, L); reset idle codes of ``codebooks`` (L, K, latent) to
        random rows of ``residuals`` (L, B, latent) and clear their optimiser moments."""
        levels, k = self.idle.shape
        for level in range(levels):
            used = torch.bincount(codes[:, level], minlength=k) > 0
            self.idle[level] = torch.where(used, 0, self.idle[level] + 1)
            dead = (self.idle[level] >= self.patience).nonzero().flatten()
            if len(dead) == 0:
                continue
            rows = torch.randint(residuals.shape[1], (len(dead),), generator=generator).to(codes.device)
            codebooks[level, dead] = residuals[level, rows]
            for moment in optimizer.state.get(codebooks, {}).values():
                if isinstance(moment, torch.Tensor) and moment.shape == codebooks.shape:
                    moment[level, dead] = 0
            self.idle[level, dead] = 0
            self.restarts[level] += len(dead)


class RQVAEQuantizer:
    """A trained :class:`RQVAE` used as a quantiser: ``encode`` embeddings (N, D) -> codes (N, L)."""

    kind = "rqvae"

    def __init__(self, model: RQVAE, *, normalize: bool, report: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.normalize = normalize
        self._report = report or {}

    @property
    def levels(self) -> int:
        return self.model.levels

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        *,
        levels: int,
        codebook_size: int,
        cfg: RQVAEConfig,
        kmeans: KMeansConfig,
        seed: int = 0,
        normalize: bool = True,
        device: str = "cpu",
        model: RQVAE | None = None,
    ) -> RQVAEQuantizer:
        """Train on ``embeddings`` (N, D). A given ``model`` is trained as it is (no k-means init)."""
        x = embeddings.to(device=device, dtype=torch.float32)
        x = F.normalize(x, dim=1) if normalize else x
        n = x.shape[0]
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = RQVAE(
                    input_dim=x.shape[1],
                    latent_dim=cfg.latent_dim,
                    hidden_dims=cfg.hidden_dims,
                    levels=levels,
                    codebook_size=codebook_size,
                )
            model = model.to(device)
            with torch.no_grad():
                latents = torch.cat([model.encoder(chunk) for chunk in x.split(kmeans.chunk_size)])
                init = ResidualKMeans.fit(
                    latents,
                    levels=levels,
                    codebook_size=codebook_size,
                    iters=kmeans.iters,
                    init=kmeans.init,
                    fit_sample=kmeans.fit_sample,
                    seed=seed,
                    chunk_size=kmeans.chunk_size,
                    normalize=False,
                    device=device,
                )
                model.codebooks.copy_(init.codebooks)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        networks = [p for name, p in model.named_parameters() if name != "codebooks"]
        optimizer = torch.optim.AdamW(  # no weight decay on codes: it would drag unused ones to 0
            [{"params": networks}, {"params": [model.codebooks], "weight_decay": 0.0}], lr=cfg.lr
        )
        tracker = DeadCodeTracker(levels, codebook_size, cfg.dead_code_steps, x.device)
        steps, recon_sum, vq_sum, seen = 0, 0.0, 0.0, 0
        with progress() as bar:
            task = bar.add_task("training RQ-VAE", total=cfg.epochs)
            for epoch in range(cfg.epochs):
                last = epoch == cfg.epochs - 1
                for rows in torch.randperm(n, generator=generator).split(cfg.batch_size):
                    out = model(x[rows.to(x.device)], commitment=cfg.commitment)
                    optimizer.zero_grad(set_to_none=True)
                    (out.recon_loss + out.vq_loss).backward()
                    optimizer.step()
                    tracker.step(out.codes, out.residuals, model.codebooks, optimizer, generator)
                    steps += 1
                    if last:
                        recon_sum += out.recon_loss.item() * len(rows)
                        vq_sum += out.vq_loss.item() * len(rows)
                        seen += len(rows)
                bar.advance(task)
        quantizer = cls(model, normalize=normalize)
        codes = quantizer.encode(embeddings, chunk_size=kmeans.chunk_size)
        recon = quantizer.decode(codes)
        target = x.cpu()
        quantizer._report = {
            "steps": steps,
            "last_epoch_recon_loss": recon_sum / max(seen, 1),
            "last_epoch_vq_loss": vq_sum / max(seen, 1),
            "recon_mse": float(F.mse_loss(recon, target)),
            "codes_used": [int(torch.unique(codes[:, level]).numel()) for level in range(levels)],
            "restarts": tracker.restarts.tolist(),
            "config": asdict(cfg),
        }
        return quantizer

    @torch.no_grad()
    def latents(self, embeddings: torch.Tensor, chunk_size: int = 65_536) -> torch.Tensor:
        """Encoder output (N, latent) of ``embeddings`` (N, D)."""
        device = self.model.codebooks.device
        out = []
        for chunk in embeddings.split(chunk_size):
            x = chunk.to(device=device, dtype=torch.float32)
            out.append(self.model.encoder(F.normalize(x, dim=1) if self.normalize else x))
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, embeddings: torch.Tensor, chunk_size: int = 65_536) -> torch.Tensor:
        """Codes (N, L) int64 of ``embeddings`` (N, D)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.model.input_dim:
            raise ValueError(
                f"expected embeddings (N, {self.model.input_dim}), got {tuple(embeddings.shape)}"
            )
        return torch.cat(
            [self.model.quantize(z)[0].cpu() for z in self.latents(embeddings, chunk_size).split(chunk_size)]
        )

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstructed embeddings (N, D) (normalised space when ``normalize``) from codes (N, L)."""
        book = self.model.codebooks
        levels = torch.arange(self.levels, device=book.device)
        return self.model.decoder(
            book[levels, codes.to(book.device)].sum(1)
        ).cpu()  # (N, L, latent) -> (N, D)

    def report(self) -> dict[str, Any]:
        """Training summary: steps, losses, reconstruction MSE on all items, codes used, restarts."""
        return dict(self._report)

    def save(self, path: Path) -> None:
        meta = {
            "kind": self.kind,
            "normalize": self.normalize,
            "input_dim": self.model.input_dim,
            "latent_dim": self.model.latent_dim,
            "hidden_dims": self.model.hidden_dims,
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "report": self._report,
        }
        save_tensors(path, dict(self.model.state_dict()), meta)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> RQVAEQuantizer:
        tensors, meta = load_tensors(path, "quantiser")
        if meta.get("kind") != cls.kind:
            raise SIDFileError(path, f"holds a {meta.get('kind')!r} quantiser, not {cls.kind!r}")
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
            model = RQVAE(
                input_dim=meta["input_dim"],
                latent_dim=meta["latent_dim"],
                hidden_dims=meta["hidden_dims"],
                levels=meta["levels"],
                codebook_size=meta["codebook_size"],
            )
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise SIDFileError(path, f"RQ-VAE weights do not fit its recorded shape ({e})") from None
        return cls(model.to(device), normalize=meta["normalize"], report=meta.get("report"))
