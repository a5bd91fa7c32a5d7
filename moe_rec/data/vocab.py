"""The token vocabulary shared by every service.

Layout (ids are contiguous, in this order)::

    0 .. 7                         special tokens: [PAD] [BOS] [EOS] [SEP] [UNK] and 3 reserved
    S0 .. S0+service_slots-1       one token per service (slots beyond the known services are
                                   reserved, so a service can be added without resizing)
    C0 + l*K + c                   code c (0 <= c < K) of level l (0 <= l < L); each level has its
                                   own K tokens, so "code 5 at level 1" and "code 5 at level 2" differ
    D0 + d                         dedup code d (0 <= d < dedup_size), the last token of every item
    X0 + w                         text token w (0 <= w < text_size) of the subword tokenizer
                                   (:mod:`moe_rec.data.text_tokenizer`; none without text)

with ``S0 = 8``, ``C0 = S0 + service_slots``, ``D0 = C0 + L*K`` and ``X0 = D0 + dedup_size``. An
item is written as ``[service][c1]..[cL][dedup]``: L+2 tokens; a critique as ``[CRITIQUE]`` and its
text tokens, a narrative as ``[EXPLAIN]``, its text tokens and ``[EOS]``. The vocabulary knows
nothing about which items exist; that is the SID table's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[SEP]", "[UNK]", "[CRITIQUE]", "[EXPLAIN]", "[RESERVED7]")
PAD, BOS, EOS, SEP, UNK, CRITIQUE, EXPLAIN = range(7)


@dataclass(frozen=True)
class Vocabulary:
    services: tuple[str, ...]
    levels: int  # L
    codebook_size: int  # K
    dedup_size: int  # range of the final dedup code
    service_slots: int = field(default=0)  # 0: exactly len(services)
    text_size: int = 0  # subword tokens of the text tokenizer (0: no text)

    def __post_init__(self) -> None:
        if len(set(self.services)) != len(self.services):
            raise ValueError(f"duplicate service names in {self.services}")
        slots = self.service_slots or len(self.services)
        if slots < len(self.services):
            raise ValueError(f"service_slots={self.service_slots} < {len(self.services)} services")
        object.__setattr__(self, "service_slots", slots)
        object.__setattr__(self, "services", tuple(self.services))

    @property
    def service_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def code_offset(self) -> int:
        return self.service_offset + self.service_slots

    @property
    def dedup_offset(self) -> int:
        return self.code_offset + self.levels * self.codebook_size

    @property
    def text_offset(self) -> int:
        return self.dedup_offset + self.dedup_size

    @property
    def size(self) -> int:
        return self.text_offset + self.text_size

    def is_text(self, token: int) -> bool:
        """Whether ``token`` is a text token (a subword, not a special token)."""
        return self.text_offset <= token < self.size

    @property
    def tokens_per_item(self) -> int:
        return self.levels + 2

    def service_index(self, service: str) -> int:
        try:
            return self.services.index(service)
        except ValueError:
            raise KeyError(f"unknown service {service!r}; known: {list(self.services)}") from None

    def service_token(self, service: str) -> int:
        return self.service_offset + self.service_index(service)

    def item_tokens(self, service: str, codes: Sequence[int]) -> list[int]:
        """``[service][c1]..[cL][dedup]`` for one item whose codes are ``(c1..cL, dedup)``."""
        if len(codes) != self.levels + 1:
            raise ValueError(f"expected {self.levels + 1} codes (L levels + dedup), got {len(codes)}")
        out = [self.service_token(service)]
        for level, c in enumerate(codes[:-1]):
            if not 0 <= c < self.codebook_size:
                raise ValueError(f"code {c} at level {level} outside [0, {self.codebook_size})")
            out.append(self.code_offset + level * self.codebook_size + int(c))
        if not 0 <= codes[-1] < self.dedup_size:
            raise ValueError(f"dedup code {codes[-1]} outside [0, {self.dedup_size})")
        out.append(self.dedup_offset + int(codes[-1]))
        return out

    def code_token_range(self, depth: int) -> tuple[int, int]:
        """Token id range ``[start, stop)`` of item depth ``depth`` (0..L-1 levels, L = dedup)."""
        if depth < self.levels:
            start = self.code_offset + depth * self.codebook_size
            return start, start + self.codebook_size
        if depth == self.levels:
            return self.dedup_offset, self.dedup_offset + self.dedup_size
        raise ValueError(f"depth {depth} > {self.levels}")

    def decode_item(self, tokens: Sequence[int]) -> tuple[str, tuple[int, ...]]:
        """Inverse of :meth:`item_tokens`: ``(service, (c1..cL, dedup))``."""
        if len(tokens) != self.tokens_per_item:
            raise ValueError(f"an item is {self.tokens_per_item} tokens, got {len(tokens)}")
        s = tokens[0] - self.service_offset
        if not 0 <= s < len(self.services):
            raise ValueError(f"token {tokens[0]} is not a service token")
        codes = []
        for depth, t in enumerate(tokens[1:]):
            start, stop = self.code_token_range(depth)
            if not start <= t < stop:
                raise ValueError(f"token {t} at depth {depth} outside [{start}, {stop})")
            codes.append(t - start)
        return self.services[s], tuple(codes)

    def token_name(self, token: int) -> str:
        """Human-readable name, e.g. ``[svc:grocery]``, ``[c2:17]``, ``[dedup:0]``."""
        if token < self.service_offset:
            return SPECIAL_TOKENS[token]
        if token < self.code_offset:
            i = token - self.service_offset
            return f"[svc:{self.services[i]}]" if i < len(self.services) else f"[svc-slot:{i}]"
        if token < self.dedup_offset:
            level, code = divmod(token - self.code_offset, self.codebook_size)
            return f"[c{level + 1}:{code}]"
        if token < self.text_offset:
            return f"[dedup:{token - self.dedup_offset}]"
        if token < self.size:
            return f"[text:{token - self.text_offset}]"
        raise ValueError(f"token {token} outside the vocabulary of size {self.size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["services"] = list(self.services)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(**{**d, "services": tuple(d["services"])})
