"""Config of the semantic-ID stage: text encoder, quantiser and code layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class EncoderConfig:
    model: str = "default"  # a sentence-transformers name or path; "default" = offline MiniLM package
    batch_size: int = 256  # texts per forward pass of the encoder
    device: str = "cpu"  # "cpu", "cuda", or "auto" (cuda when available)
    cache_dir: Path | None = None  # embedding cache; None: the caller's default (<out_dir>/embedding_cache)


@dataclass
class KMeansConfig:
    iters: int = 25  # Lloyd iterations per level
    fit_sample: int = 200_000  # centroids are fitted on at most this many items, then all are assigned
    init: Literal["kmeans++", "random"] = "kmeans++"  # centroid initialisation of every level
    chunk_size: int = 65_536  # rows per distance block when assigning (bounds memory at N x D)


@dataclass
class RQVAEConfig:
    latent_dim: int = 32  # width of the quantised latent
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])  # encoder MLP; decoder mirrors it
    epochs: int = 200  # passes over the items
    batch_size: int = 1024  # items per optimiser step
    lr: float = 1e-3  # AdamW learning rate
    commitment: float = 0.25  # beta of the commitment loss
    dead_code_steps: int = 100  # a code unused for this many steps is restarted on a random residual


@dataclass
class PQConfig:
    opq_iters: int = 10  # quantizer "opq": rounds of rotation learning (each a PQ fit + one SVD)


@dataclass
class SIDConfig:
    # how embeddings become codes: residual levels (residual_kmeans, rqvae) or independent
    # sub-space codes (pq, opq; `levels` must divide the embedding size, e.g. 8, 16, 32 for 384)
    quantizer: Literal["residual_kmeans", "rqvae", "pq", "opq"] = "residual_kmeans"
    levels: int = 3  # L codebook levels
    codebook_size: int = 256  # K codes per level (one codebook shared by all services)
    max_dedup: int = 256  # size of the final dedup code range; more colliding items is an error
    normalize: bool = True  # L2-normalise embeddings before quantising
    seed: int = 0  # seeds sampling, initialisation and training of the quantiser
    device: str = "cpu"  # quantiser device: "cpu", "cuda" or "auto"; codes are reproducible per device
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # item text -> embedding
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)  # residual k-means; inits RQ-VAE codes
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)  # used when quantizer == "rqvae"
    pq: PQConfig = field(default_factory=PQConfig)  # used when quantizer == "opq"

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codebook_size < 2 or self.max_dedup < 1:
            raise ValueError("levels >= 1, codebook_size >= 2 and max_dedup >= 1 are required")
        if self.kmeans.iters < 1 or self.kmeans.fit_sample < 1 or self.kmeans.chunk_size < 1:
            raise ValueError("kmeans.iters, kmeans.fit_sample and kmeans.chunk_size must be >= 1")
        if self.pq.opq_iters < 1 and self.quantizer == "opq":
            raise ValueError("sid.pq.opq_iters must be >= 1 for quantizer 'opq' (0 rounds is plain 'pq')")
