"""Shared setup of the semantic-ID tests: offline Hugging Face, small random embeddings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def clustered() -> torch.Tensor:
    """(600, 16) float32: 12 Gaussian clusters of 50 points, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(12, 16, generator=g) * 3
    return (centers.repeat_interleave(50, 0) + torch.randn(600, 16, generator=g)).float()
