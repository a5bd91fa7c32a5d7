"""The tensor trie answers exactly like the dict-of-dicts reference, for every prefix."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_rec.sid.io import SIDFileError
from moe_rec.sid.trie import ReferenceTrie, SIDTrie, UnknownServiceError

SERVICES = ["grocery", "market", "delivery"]


def random_ids(vocab: list[int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct (service, ID) rows: service indices (n,) and codes (n, len(vocab))."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    while len(rows) < n:
        s = int(torch.randint(0, len(SERVICES), (1,), generator=g))
        codes = tuple(int(torch.randint(0, v, (1,), generator=g)) for v in vocab)
        rows[(s, *codes)] = None
    keys = torch.tensor(list(rows))
    return keys[:, 0], keys[:, 1:]


def build_both(
    vocab: list[int], n: int, seed: int
) -> tuple[SIDTrie, ReferenceTrie, torch.Tensor, torch.Tensor]:
    service_index, codes = random_ids(vocab, n, seed)
    ref = ReferenceTrie()
    for s, row in zip(service_index.tolist(), codes.tolist(), strict=True):
        ref.insert(SERVICES[s], row)
    return SIDTrie.build(SERVICES, service_index, codes, vocab), ref, service_index, codes


def expected_mask(ref: ReferenceTrie, service: str, prefix: list[int], v: int) -> list[bool]:
    allowed = ref.allowed(service, prefix)
    return [c in allowed for c in range(v)]


def test_exhaustive_parity_small() -> None:
    vocab = [3, 3, 2]  # L = 2 codes of K = 3, dedup range 2
    trie, ref, _, _ = build_both(vocab, 25, seed=0)
    for service in SERVICES:
        for depth in range(len(vocab)):
            ranges = [range(-1, v + 1) for v in vocab[:depth]]  # every prefix, including out-of-range codes
            prefixes = list(itertools.product(*ranges))
            batch = torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), depth)
            mask = trie.allowed(service, batch)
            assert mask.tolist() == [expected_mask(ref, service, list(p), vocab[depth]) for p in prefixes]
        full = list(itertools.product(*[range(-1, v + 1) for v in vocab]))
        got = trie.contains(service, torch.tensor(full))
        assert got.tolist() == [ref.contains(service, list(c), len(vocab)) for c in full]


@pytest.mark.parametrize("seed", [1, 2])
def test_random_prefixes_every_depth_mixed_services(seed: int) -> None:
    vocab = [16, 16, 16, 4]
    trie, ref, service_index, codes = build_both(vocab, 500, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for depth in range(len(vocab)):
        b = 256
        rows = torch.randint(0, len(codes), (b,), generator=g)
        prefix = codes[rows, :depth].clone()
        services = service_index[rows].clone()
        noisy = torch.rand(b, generator=g) < 0.5  # half real prefixes, half random (often invalid)
        services[noisy] = torch.randint(0, len(SERVICES), (int(noisy.sum()),), generator=g)
        prefix[noisy] = torch.randint(-1, 17, (int(noisy.sum()), depth), generator=g)
        names = [SERVICES[s] for s in services.tolist()]
        mask = trie.allowed(names, prefix)
        assert mask.shape == (b, vocab[depth])
        want = [expected_mask(ref, s, p, vocab[depth]) for s, p in zip(names, prefix.tolist(), strict=True)]
        assert mask.tolist() == want
        assert torch.equal(trie.allowed(services, prefix), mask)  # service indices work the same
    names = [SERVICES[s] for s in service_index.tolist()]
    assert bool(trie.contains(names, codes).all())
    other = [SERVICES[(s + 1) % 3] for s in service_index.tolist()]
    want = [ref.contains(s, c, len(vocab)) for s, c in zip(other, codes.tolist(), strict=True)]
    assert trie.contains(other, codes).tolist() == want


def test_save_load_and_errors(tmp_path) -> None:
    vocab = [8, 8, 2]
    trie, _, service_index, codes = build_both(vocab, 100, seed=3)
    trie.save(tmp_path / "trie.safetensors")
    loaded = SIDTrie.load(tmp_path / "trie.safetensors")
    prefix = codes[:50, :2]
    assert torch.equal(loaded.allowed(service_index[:50], prefix), trie.allowed(service_index[:50], prefix))
    with pytest.raises(UnknownServiceError, match="nope"):
        trie.allowed("nope", prefix)
    with pytest.raises(ValueError, match="full ID"):
        trie.allowed("market", codes[:2])
    raw = bytearray((tmp_path / "trie.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "trie.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SIDFileError, match="corrupt"):
        SIDTrie.load(tmp_path / "trie.safetensors")
    with pytest.raises(SIDFileError, match="not found"):
        SIDTrie.load(tmp_path / "missing.safetensors")
