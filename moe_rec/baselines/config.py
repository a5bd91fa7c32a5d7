"""Config of the learned baselines (kept apart from the models so loading a config stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SASRecConfig:
    """SASRec with full cross-entropy (``moe-rec eval --baseline sasrec``), one model per service.

    Defaults follow Kang & McAuley (2018) for the sparse Amazon sets (64 hidden units, 2 blocks,
    1 head, dropout 0.5, 50 items, Adam lr 1e-3, batch 128); early stopping on validation NDCG@10.
    """

    hidden: int = 64  # item / position embedding and block width
    layers: int = 2  # self-attention blocks
    heads: int = 1  # attention heads (hidden must divide by it)
    dropout: float = 0.5  # embedding, attention, feed-forward dropout
    max_len: int = 50  # most recent items a sequence keeps (training input and evaluation history)
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW decoupled weight decay (0: plain Adam)
    batch_size: int = 128  # training sequences (users) per step
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    eval_every: int = 2  # epochs between validation evaluations
    patience: int = 10  # validation evaluations without a better NDCG@10 before stopping
    eval_batch_size: int = 512  # requests scored at once
    seed: int = 0
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    services: list[str] | None = None  # services to train and evaluate (default: all in the data)

    def __post_init__(self) -> None:
        positive = ("hidden", "layers", "heads", "max_len", "batch_size", "epochs", "eval_every")
        for name in positive + ("patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0 or self.num_threads < 0:
            raise ValueError("lr > 0, weight_decay >= 0 and num_threads >= 0 are required")
