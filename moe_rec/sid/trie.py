"""A tensor trie of the valid semantic IDs of every service, for constrained decoding.

Beam search asks, for a batch of beams, "which codes may come next after this prefix in this
service?". Answering that with a Python callback per beam costs 6-24 ms a step; here it is a few
tensor ops for the whole batch. An ID ``(s, c_1..c_{L+1})`` (service index, L quantiser codes,
the dedup code) is packed into one int64 in mixed radix ``[S, V_1, ..., V_{L+1}]``; for every
depth d the trie keeps the sorted unique packed prefixes of length d. All IDs that extend a prefix
``p`` of length d are one contiguous range ``[p * V_{d+1}, (p + 1) * V_{d+1})`` of the packed
prefixes of length d+1, found with ``searchsorted``; the last digit of each key in the range is an
allowed next code. Everything stays on the trie's device, vectorised over the batch.

:class:`ReferenceTrie` is the plain dict-of-dicts version the tensor trie is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moe_rec.config import ConfigError
from moe_rec.errors import MoeRecError
from moe_rec.sid.io import SIDFileError, load_tensors, save_tensors

TRIE_FILE = "sid_trie.safetensors"


class UnknownServiceError(MoeRecError, LookupError):
    """A service that has no semantic IDs."""


def fits_int64(radices: Sequence[int]) -> bool:
    """Whether IDs in mixed radix ``radices`` pack into an int64 key."""
    total = 1
    for r in radices:
        total *= r
    return total < 2**63


def check_radices(radices: Sequence[int]) -> None:
    """Raise unless IDs in mixed radix ``radices`` fit an int64."""
    if not fits_int64(radices):
        raise ConfigError(
            f"IDs with digit ranges {list(radices)} do not fit in int64; use fewer levels or codes"
        )


def pack_codes(codes: torch.Tensor, radices: Sequence[int]) -> torch.Tensor:
    """Pack digits (B, n) with ranges ``radices`` (n,) into int64 keys (B,), first digit most
    significant, so keys sort like the digit tuples."""
    key = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for j, r in enumerate(radices):
        key = key * r + codes[:, j]
    return key


def in_range(codes: torch.Tensor, radices: Sequence[int]) -> torch.Tensor:
    """(B,) True where every digit of ``codes`` (B, n) lies in ``[0, radices[j])``."""
    upper = torch.tensor(list(radices), dtype=torch.long, device=codes.device)
    return ((codes >= 0) & (codes < upper)).all(1)


class SIDTrie:
    """Valid IDs per service as sorted packed prefixes, one tensor per depth.

    Args:
        services: service names; a service's index is its position.
        vocab_sizes: range of each code position, ``[K] * L + [max_dedup]``.
        prefixes: ``prefixes[d]`` = sorted unique int64 keys of ``(s, c_1..c_{d+1})``, d = 0..L.
    """

    def __init__(
        self, services: Sequence[str], vocab_sizes: Sequence[int], prefixes: list[torch.Tensor]
    ) -> None:
        if len(prefixes) != len(vocab_sizes):
            raise ValueError(f"{len(prefixes)} prefix tensors for {len(vocab_sizes)} code positions")
        self.services = list(services)
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.prefixes = prefixes
        self._service_index = {s: i for i, s in enumerate(self.services)}
        check_radices([len(self.services), *self.vocab_sizes])

    @classmethod
    def build(
        cls,
        services: Sequence[str],
        service_index: torch.Tensor,
        codes: torch.Tensor,
        vocab_sizes: Sequence[int],
    ) -> SIDTrie:
        """Trie of IDs ``codes`` (N, L+1) whose services are ``services[service_index]`` (N,)."""
        if codes.ndim != 2 or codes.shape[1] != len(vocab_sizes) or service_index.shape != codes.shape[:1]:
            raise ValueError(
                f"codes {tuple(codes.shape)} and service_index {tuple(service_index.shape)} do not fit "
                f"{len(vocab_sizes)} code positions"
            )
        radices = [len(services), *vocab_sizes]
        digits = torch.cat([service_index[:, None].long(), codes.long()], 1)  # (N, 1 + L+1)
        if not bool(in_range(digits, radices).all()):
            raise ValueError(f"codes or service indices outside the ranges {radices}")
        prefixes = [
            torch.unique(pack_codes(digits[:, : d + 2], radices[: d + 2])) for d in range(len(vocab_sizes))
        ]
        return cls(services, vocab_sizes, prefixes)

    @property
    def depth(self) -> int:
        """Code positions of a full ID (L + 1)."""
        return len(self.vocab_sizes)

    @property
    def device(self) -> torch.device:
        return self.prefixes[0].device

    def to(self, device: str | torch.device) -> SIDTrie:
        return SIDTrie(self.services, self.vocab_sizes, [p.to(device) for p in self.prefixes])

    def service_ids(self, service: str | Sequence[str] | torch.Tensor, batch: int) -> torch.Tensor:
        """Service indices (B,) for one service name, B names, or B indices."""
        if isinstance(service, torch.Tensor):
            return service.to(self.device, torch.long).expand(batch)
        names = [service] * batch if isinstance(service, str) else list(service)
        if len(names) != batch:
            raise ValueError(f"{len(names)} services for a batch of {batch}")
        try:
            return torch.tensor([self._service_index[s] for s in names], dtype=torch.long, device=self.device)
        except KeyError as e:
            raise UnknownServiceError(f"unknown service {e.args[0]!r}; known: {self.services}") from None

    def allowed(self, service: str | Sequence[str] | torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Mask of the codes that may follow each prefix.

        Args:
            service: one service name, or B names / indices (one per row).
            prefix: (B, l) codes so far, 0 <= l <= L.
        Returns:
            (B, V_{l+1}) bool; an all-False row for a prefix that no item has.
        """
        b, length = prefix.shape
        if length >= self.depth:
            raise ValueError(f"a prefix of length {length} is already a full ID (depth {self.depth})")
        prefix = prefix.to(self.device, torch.long)
        digits = torch.cat([self.service_ids(service, b)[:, None], prefix], 1)  # (B, 1 + l)
        radices = [len(self.services), *self.vocab_sizes[:length]]
        ok = in_range(digits, radices)  # out-of-range digits would alias other prefixes
        key = pack_codes(torch.where(ok[:, None], digits, 0), radices)  # (B,)
        v = self.vocab_sizes[length]
        keys = self.prefixes[length]  # sorted packed prefixes of length l + 1
        lo = torch.searchsorted(keys, key * v)
        hi = torch.searchsorted(keys, (key + 1) * v)
        counts = torch.where(ok, hi - lo, 0)  # (B,) children per row
        rows = torch.repeat_interleave(torch.arange(b, device=self.device), counts)
        starts = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)
        children = keys[starts + torch.arange(len(rows), device=self.device)] % v
        mask = torch.zeros(b, v, dtype=torch.bool, device=self.device)
        mask[rows, children] = True
        return mask

    def contains(self, service: str | Sequence[str] | torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B,) True where ``codes`` (B, L+1) is the full ID of an item of the row's service."""
        if codes.ndim != 2 or codes.shape[1] != self.depth:
            raise ValueError(f"expected codes (B, {self.depth}), got {tuple(codes.shape)}")
        codes = codes.to(self.device, torch.long)
        digits = torch.cat([self.service_ids(service, codes.shape[0])[:, None], codes], 1)
        radices = [len(self.services), *self.vocab_sizes]
        ok = in_range(digits, radices)
        key = pack_codes(torch.where(ok[:, None], digits, 0), radices)
        keys = self.prefixes[-1]
        pos = torch.searchsorted(keys, key).clamp_max(len(keys) - 1)
        return ok & (keys[pos] == key)

    def save(self, path: Path) -> None:
        tensors = {f"prefixes_{d}": p for d, p in enumerate(self.prefixes)}
        save_tensors(path, tensors, {"services": self.services, "vocab_sizes": self.vocab_sizes})

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> SIDTrie:
        """Load a trie (``path`` is the file or the directory holding :data:`TRIE_FILE`)."""
        path = Path(path)
        path = path / TRIE_FILE if path.is_dir() else path
        tensors, meta = load_tensors(path, "SID trie")
        try:
            prefixes = [tensors[f"prefixes_{d}"].to(device) for d in range(len(meta["vocab_sizes"]))]
            return cls(meta["services"], meta["vocab_sizes"], prefixes)
        except (KeyError, ValueError) as e:
            raise SIDFileError(path, f"SID trie is incomplete ({e}); rebuild it") from None


class ReferenceTrie:
    """Plain dict-of-dicts trie with the same questions as :class:`SIDTrie` (for tests)."""

    def __init__(self) -> None:
        self.roots: dict[str, dict] = {}

    def insert(self, service: str, codes: Sequence[int]) -> None:
        node = self.roots.setdefault(service, {})
        for c in codes:
            node = node.setdefault(int(c), {})

    def _node(self, service: str, prefix: Sequence[int]) -> dict | None:
        node = self.roots.get(service)
        for c in prefix:
            if node is None:
                return None
            node = node.get(int(c))
        return node

    def allowed(self, service: str, prefix: Sequence[int]) -> set[int]:
        node = self._node(service, prefix)
        return set(node) if node else set()

    def contains(self, service: str, codes: Sequence[int], depth: int) -> bool:
        return len(codes) == depth and self._node(service, codes) is not None
