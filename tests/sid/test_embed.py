"""Text encoder with the real offline MiniLM: cache hits, partial misses, corruption handling."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_rec.sid.embed import TextEncoder, model_fingerprint, resolve_device, resolve_model

TEXTS = [
    "Red lipstick, matte finish. Category: Beauty > Makeup > Lips. Brand: Acme. Price: 9.99.",
    "Argan oil shampoo for dry hair. Category: Beauty > Hair Care > Shampoo.",
    "Stainless steel nail clipper set.",
    "Red lipstick, matte finish. Category: Beauty > Makeup > Lips. Brand: Acme. Price: 9.99.",  # repeat
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """MiniLM vectors of TEXTS straight from sentence-transformers, no cache involved. Ours equal
    them to 1e-5: unit vectors in fp32 from batches of another size (padding changes the sums)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model("default"), device="cpu").encode(TEXTS, convert_to_numpy=True)


def test_cache_hit_encodes_nothing_and_new_texts_only_new(tmp_path, reference: np.ndarray) -> None:
    first = TextEncoder("default", cache_dir=tmp_path)
    vectors = first.encode(TEXTS)
    assert vectors.shape == (4, 384) and vectors.dtype == torch.float32
    assert first.last_encoded == 3  # the repeated text is encoded once
    np.testing.assert_allclose(vectors.numpy(), reference, atol=1e-5)

    again = TextEncoder("default", cache_dir=tmp_path)
    assert torch.equal(again.encode(TEXTS), vectors)
    assert again.last_encoded == 0
    more = again.encode([*TEXTS, "Lavender bath salts."])
    assert again.last_encoded == 1
    assert torch.equal(more[:4], vectors)


def test_corrupt_shard_is_dropped_with_a_warning_and_reencoded(tmp_path, reference: np.ndarray) -> None:
    TextEncoder("default", cache_dir=tmp_path).encode(TEXTS)
    (shard,) = tmp_path.rglob("shard-*.safetensors")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit inside the stored vectors
    shard.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="re-encoded"):
        encoder = TextEncoder("default", cache_dir=tmp_path)
    vectors = encoder.encode(TEXTS)
    assert encoder.last_encoded == 3
    np.testing.assert_allclose(vectors.numpy(), reference, atol=1e-5)

    (shard,) = tmp_path.rglob("shard-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="re-encoded"):
        assert len(TextEncoder("default", cache_dir=tmp_path).cache) == 0


def test_fingerprint_follows_model_files(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    before = model_fingerprint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden": 1}')
    assert model_fingerprint(str(tmp_path)) != before
    assert model_fingerprint("some/hub-name") == "name:some/hub-name"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow  # a fresh process imports torch and sentence-transformers: ~20 s
def test_loading_the_model_prints_nothing_on_stdout(tmp_path) -> None:
    """A fresh process under ``WANDB_MODE=offline`` (as ``moe-rec run`` runs): stdout stays for results."""
    code = "from moe_rec.sid.embed import TextEncoder; TextEncoder('default').load_model()"
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
