"""Config of the critiques stage (``critiques:`` in an experiment YAML): critiques and narratives.

``moe-rec critiques build`` always builds; ``moe-rec run`` builds only with ``critiques.enabled:
true``. What each knob does is described in :mod:`moe_rec.data.critiques`,
:mod:`moe_rec.data.narratives` and :mod:`moe_rec.data.item_attributes`; ``docs/critiques.md``
gives the measured effect of the defaults on Amazon Beauty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_rec.data.item_attributes import BAND_NAMES
from moe_rec.data.wording import CRITIQUE_FAMILIES, NARRATIVE_FAMILIES


def _check_held_out(kind: str, held_out: list[str], families: dict) -> None:
    unknown = sorted(set(held_out) - set(families))
    if unknown:
        raise ValueError(f"{kind}: unknown famil(ies) {unknown}; known: {sorted(families)}")
    if set(held_out) >= set(families):
        raise ValueError(f"{kind}: every family is held out; training needs at least one")


@dataclass
class NarrativeConfig:
    enabled: bool = True  # build narratives beside the critiques
    held_out_families: list[str] = field(default_factory=lambda: ["bullets", "friend"])  # test only
    # training targets: every training event with an event before it, or each history's last one
    train_targets: Literal["all", "last"] = "all"
    max_terms: int = 2  # distinctive terms named in what the item is

    def __post_init__(self) -> None:
        _check_held_out("narratives.held_out_families", self.held_out_families, NARRATIVE_FAMILIES)
        if self.max_terms < 0:
            raise ValueError(f"narratives.max_terms must be >= 0, got {self.max_terms}")


@dataclass
class CritiqueConfig:
    enabled: bool = False  # moe-rec run builds critiques (and narratives) only when true
    seed: int = 0  # every choice (types, family, phrasing) is a hash of (seed, user, service, position)
    services: list[str] | None = None  # services to build for (default: all of the prepared data)
    # a pair is similar when its items share this many category levels below the service's common
    # root (Beauty: 1 = the same department, e.g. Makeup); pairs whose items lack categories are
    # compared by text embedding instead (sid.encoder), similar when their cosine is at least this
    # quantile of the cosines of random pairs of the service's events
    min_shared_levels: int = 1
    embedding_quantile: float = 0.9
    calibration_pairs: int = 20_000  # random pairs that set the embedding threshold
    price_bands: int = 3  # quantile bands per leaf category (2 to 5)
    min_band_items: int = 20  # a leaf with fewer priced items takes its parent's bands
    size_ratio: float = 1.2  # "bigger"/"smaller" when amounts differ by at least this factor
    max_terms: int = 1  # distinctive terms one critique may name (docs/critiques.md: 2 leaks more)
    min_term_df: int = 5  # leakage guard: a term must appear in at least this many items' titles
    max_term_share: float = 0.05  # terms in more of the service's items are not distinctive
    brand_share: float = 0.5  # a word this concentrated in one brand (or leading the text) is a brand word
    leading_share: float = 0.5
    # leakage guard: what a critique names (leaf category, brand, terms, colour) must fit at least
    # this many items of the service, else the most specific part is dropped
    min_matching_items: int = 20
    max_types: int = 3  # changes named in one critique (1..this, drawn per pair)
    held_out_families: list[str] = field(default_factory=lambda: ["seen_it", "terse"])  # test only
    test_held_out_share: float = 0.5  # share of test critiques worded in a held-out family
    leakage_sample: int = 5000  # train and valid critiques whose retrieval leakage is measured (test: all)
    narratives: NarrativeConfig = field(default_factory=NarrativeConfig)

    def __post_init__(self) -> None:
        _check_held_out("critiques.held_out_families", self.held_out_families, CRITIQUE_FAMILIES)
        if self.price_bands not in BAND_NAMES:
            raise ValueError(
                f"critiques.price_bands must be one of {sorted(BAND_NAMES)}, got {self.price_bands}"
            )
        counts = ("min_shared_levels", "min_band_items", "max_terms", "min_term_df", "min_matching_items")
        for name in (*counts, "max_types"):
            if getattr(self, name) < 1:
                raise ValueError(f"critiques.{name} must be >= 1, got {getattr(self, name)}")
        shares = ("embedding_quantile", "max_term_share", "brand_share", "leading_share")
        for name in (*shares, "test_held_out_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"critiques.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.size_ratio < 1.0:
            raise ValueError(f"critiques.size_ratio must be >= 1, got {self.size_ratio}")
        if self.calibration_pairs < 1 or self.leakage_sample < 0:
            raise ValueError("critiques.calibration_pairs must be >= 1 and leakage_sample >= 0")
