"""What the catalogue says about each item, in the form critiques and narratives need.

A critique names what changes from one item to the next ("cheaper", "by Maybelline", "in lip
gloss", "with argan"), and a narrative says what an item is; both read the prepared catalogue
(``<run_dir>/data/items``, :data:`~moe_rec.data.schema.ITEM_SCHEMA`) through this module. For one
service it derives, per item, whatever the source has:

* **category path** — the ``categories`` list less the leading levels every item of the service
  shares (Amazon Beauty's root ``Beauty``), so the first level left is a department;
* **brand** as given (placeholders such as "Generic" count as none), and **price** with its
  **price band**: the price's place among the quantiles of the item's leaf category
  (``num_bands`` bands), or of the nearest parent path with at least ``min_band_items`` priced
  items, or of the whole service (:func:`price_bands`);
* **distinctive terms** — words among the first :data:`TITLE_WINDOW` of the title (the keyword
  text where there is no title; the product name, not the seller's tail) that a critique may name:
  no stopword or seller boilerplate, no token with a digit (model numbers, sizes), no colour or
  size word (those have their own critique), no brand word, nothing in fewer than
  ``min_term_df`` titles (a rare word would point at one item), nothing in more than
  ``max_term_share`` of them (not distinctive). A *brand word* belongs to the brands rather than
  to the products: a word whose titles come mostly (``brand_share``) from one brand
  ("regenerist" is Olay's, "paris" L'Oreal's), or that sits in a brand string and mostly in that
  brand's own titles; among items without a brand, a word that opens the titles it is in
  ``leading_share`` of the time (titles start with the brand: "coleman", "lego"; this is all
  Amazon Sports and Toys have, their keywords carry no brand field); and a word that follows one
  of those that often ("melissa doug"). :class:`TermFilter` counts the words each rule removed;
* **size** (an amount in ounce-equivalents, a count, or a size word's rank: mini < small <
  regular < large < XL), **pack** count ("pack of 3", "6-pack") and **colour** ("green tea" is
  no colour) parsed from the title.

Nothing here names an item by its id or title; :class:`ItemAttributes` keeps both only so that the
leakage checks (:mod:`moe_rec.data.leakage`) can look for them.
"""

from __future__ import annotations

import bisect
import html
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_WORD = re.compile(r"[a-z0-9]+")

STOPWORDS = frozenset(
    """a an and are as at be by for from has have in into is it its of on or our the this to with
    without your you s x w e n c d l f t new best all one no plus more most free each only also
    size oz ounce ounces fl fluid ml ct count pack pk piece pieces pcs set lb lbs kg gram grams
    inch inches mm cm ft item items product products other use day night may vary packaging
    description"""
    # seller boilerplate in Amazon titles ("100% LIFETIME Money Back Guarantee", "SALE")
    """ guarantee guaranteed money back refund satisfied satisfaction sale shipping lifetime risk try
    code buy get percent made usa quality genuine authentic original brand comes includes including
    contains featuring combo works"""
    # keyword-file artefacts of Amazon Sports and Toys ("... categories toys games", "&amp;")
    """ categories category title titles brand amp na""".split()
)
COLOURS = (
    "black", "white", "red", "blue", "pink", "purple", "green", "yellow", "orange", "brown", "beige",
    "nude", "gold", "silver", "grey", "gray", "coral", "plum", "burgundy", "navy", "teal", "ivory",
    "bronze", "violet", "turquoise", "lavender",
)  # fmt: skip
# size words by rank; a title's last size word counts ("family size" is one)
SIZE_WORDS = {
    "mini": 0, "travel size": 0, "small": 1, "compact": 1, "single": 1, "regular": 2, "medium": 2,
    "large": 3, "xl": 4, "family size": 4, "family": 4, "jumbo": 5,
}  # fmt: skip
BAND_NAMES = {  # "in the {band} range"
    2: ("lower-price", "higher-price"),
    3: ("budget", "mid-price", "premium"),
    4: ("budget", "lower mid-price", "upper mid-price", "premium"),
    5: ("budget", "value", "mid-price", "upscale", "premium"),
}
# brand values that name no brand
PLACEHOLDER_BRANDS = frozenset({"generic", "unknown", "unbranded", "none", "n a", "na", "no brand", "other"})
TITLE_WINDOW = 16  # terms come from a title's first words: the product name, not the seller's tail
# amount units -> ounce-equivalents (weight and volume mixed on purpose: "bigger" is all a
# critique says, and Amazon titles use ounces for both)
_UNIT_OZ = {
    "oz": 1.0, "ounce": 1.0, "ounces": 1.0, "floz": 1.0, "fluidounce": 1.0, "fluidounces": 1.0,
    "ml": 1 / 29.5735, "l": 33.814, "liter": 33.814, "liters": 33.814, "litre": 33.814,
    "litres": 33.814, "g": 1 / 28.3495, "gram": 1 / 28.3495, "grams": 1 / 28.3495, "kg": 35.274,
    "lb": 16.0, "lbs": 16.0, "pound": 16.0, "pounds": 16.0,
}  # fmt: skip
_AMOUNT = re.compile(
    r"(\d+(?:\.\d+)?)\s*-?\s*(fl\.?\s*oz|fluid\s+ounces?|ounces?|oz|ml|liters?|litres?|l|kg|grams?|g|lbs?|"
    r"pounds?)(?![a-z])",
    re.IGNORECASE,
)
_COUNT = re.compile(r"(\d+)\s*-?\s*(?:count|ct|pieces|pcs|sheets|wipes|capsules|tablets)(?![a-z])", re.I)
_PACK = re.compile(
    r"(?:(?:pack|set|box|case)\s+of\s+(\d+))|(?:(\d+)\s*-?\s*(?:pack|pk)(?![a-z]))|(twin\s*pack)", re.I
)
# a colour word that names a kind of thing, not its colour ("green tea", "black pepper")
_COLOUR = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\b(?!\s+(?:tea|teas|wine|wines|pepper|rice|beans?|onions?|grapes?|tiger|"
    r"friday|smoothie|curry|sea|widow|diamond)\b)",
    re.IGNORECASE,
)
_SIZE_WORD = re.compile(r"\b(" + "|".join(sorted(SIZE_WORDS, key=len, reverse=True)) + r")\b", re.I)


def words(text: str | None) -> list[str]:
    """Lower-case alphanumeric tokens of ``text`` (HTML entities decoded), in order."""
    return _WORD.findall(html.unescape(text).lower()) if text else []


@dataclass(frozen=True)
class Size:
    """A size a critique can compare: ``kind`` ``amount`` (ounce-equivalents), ``count`` or ``word``
    (a size word's rank); two sizes compare only when their kinds agree."""

    kind: str
    value: float


def parse_size(title: str | None) -> Size | None:
    """The first amount ("4.5 fl oz", "250g", "1L"), else count ("30 Count"), else last size word."""
    if not title:
        return None
    if m := _AMOUNT.search(title):
        unit = re.sub(r"[\s.]+", "", m.group(2).lower())  # "fl. oz" -> "floz"
        return Size("amount", float(m.group(1)) * _UNIT_OZ[unit])
    if m := _COUNT.search(title):
        return Size("count", float(m.group(1)))
    found = _SIZE_WORD.findall(title)
    return Size("word", float(SIZE_WORDS[found[-1].lower()])) if found else None


def parse_pack(title: str | None) -> int | None:
    """Pack count from "Pack of 3", "6-pack", "set of 2", "twin pack"; None when the title has none."""
    if not title or not (m := _PACK.search(title)):
        return None
    if m.group(3):
        return 2
    n = int(m.group(1) or m.group(2))
    return n if n >= 1 else None


def parse_colour(title: str | None) -> str | None:
    """The first colour word of the title (lower case, ``gray`` spelled ``grey``), or None."""
    if not title or not (m := _COLOUR.search(title)):
        return None
    colour = m.group(1).lower()
    return "grey" if colour == "gray" else colour


def price_bands(
    prices: Sequence[float | None], paths: Sequence[tuple[str, ...]], num_bands: int, min_items: int
) -> tuple[list[int | None], dict[tuple[str, ...], list[float]]]:
    """The band of each price among the quantiles of its category.

    A price's group is its full category path when that path has at least ``min_items`` priced
    items, else the longest prefix of it that has, else the whole service (the empty path). The
    group's cut points are its prices' ``1/num_bands .. (num_bands-1)/num_bands`` quantiles
    (``numpy.quantile``, linear), and the band is the number of cut points strictly below the
    price: 0 (cheapest) .. ``num_bands - 1``.

    Returns:
        ``(bands, cuts)``: a band per item (None without a price) and each used group's cut points.
    """
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for price, path in zip(prices, paths, strict=True):
        if price is not None:
            for k in range(len(path) + 1):
                groups[tuple(path[:k])].append(price)
    quantiles = [i / num_bands for i in range(1, num_bands)]
    cuts: dict[tuple[str, ...], list[float]] = {}
    bands: list[int | None] = []
    for price, path in zip(prices, paths, strict=True):
        if price is None:
            bands.append(None)
            continue
        k = len(path)
        while k > 0 and len(groups[tuple(path[:k])]) < min_items:
            k -= 1
        group = tuple(path[:k])
        if group not in cuts:
            cuts[group] = [float(c) for c in np.quantile(np.asarray(groups[group]), quantiles)]
        bands.append(bisect.bisect_left(cuts[group], price))
    return bands, cuts


@dataclass
class TermFilter:
    """The words a critique may name as distinctive terms, and how many each rule kept out.

    ``excluded`` counts distinct words by the first rule that removed them: ``stopword``,
    ``digit``, ``short`` (under 3 letters), ``colour_or_size``, ``rare`` (df < ``min_term_df``),
    ``common`` (df > ``max_term_share`` of the items), ``brand`` (a brand word, see the module
    docstring).
    """

    df: Counter
    idf: dict[str, float]
    allowed: frozenset[str]
    brand_words: frozenset[str]
    excluded: Counter = field(default_factory=Counter)


def _brand_words(
    tokens: Sequence[frozenset[str]], brands: Sequence[str | None], brand_share: float
) -> set[str]:
    """Tokens that belong to brands (see the module docstring), from items that have a brand."""
    brand_tokens = [frozenset(words(b)) for b in brands]
    per_brand: dict[str, Counter] = defaultdict(Counter)  # token -> brand -> items
    own = Counter()  # token -> items whose own brand string holds the token
    branded = Counter()  # token -> items with a brand
    for toks, brand, btoks in zip(tokens, brands, brand_tokens, strict=True):
        if not brand:
            continue
        key = " ".join(words(brand))
        for t in toks:
            branded[t] += 1
            per_brand[t][key] += 1
            if t in btoks:
                own[t] += 1
    in_brands = set().union(*brand_tokens) if brand_tokens else set()
    out = set()
    for t, n in branded.items():
        if n >= 2 and max(per_brand[t].values()) / n >= brand_share:
            out.add(t)
        elif t in in_brands and own[t] / n >= brand_share:
            out.add(t)
    return out


def _leading_words(
    texts: Sequence[str | None], brands: Sequence[str | None], leading_share: float, brand_words: set[str]
) -> set[str]:
    """Among items without a brand: tokens that open the texts they appear in at least
    ``leading_share`` of the time; then, over all items, the tokens that follow one of those (or
    of ``brand_words``) that often ("melissa doug")."""
    token_lists = [words(t) for t in texts]
    unbranded = [w for w, b in zip(token_lists, brands, strict=True) if not b]
    df = Counter(t for w in unbranded for t in set(w))
    leads = Counter(w[0] for w in unbranded if w)
    out = {t for t, n in leads.items() if df[t] >= 2 and n / df[t] >= leading_share} | brand_words
    df = Counter(t for w in token_lists for t in set(w))
    follows = Counter()
    for w in token_lists:
        follows.update({b for a, b in zip(w, w[1:]) if a in out})
    return out | {t for t, n in follows.items() if df[t] >= 2 and n / df[t] >= leading_share}


def term_filter(
    texts: Sequence[str | None],
    brands: Sequence[str | None],
    *,
    min_term_df: int,
    max_term_share: float,
    brand_share: float,
    leading_share: float,
) -> TermFilter:
    """Document frequencies over ``texts`` (one per item) and the words allowed as terms.

    Brand words are those of the brands (where items have one) and of the leading position
    (``leading_share``), see the module docstring.
    """
    tokens = [frozenset(words(t)) for t in texts]
    n = len(tokens)
    df = Counter(t for toks in tokens for t in toks)
    idf = {t: math.log(n / c) for t, c in df.items()}
    brand_words = _leading_words(texts, brands, leading_share, _brand_words(tokens, brands, brand_share))
    special = set(COLOURS) | {w for phrase in SIZE_WORDS for w in phrase.split()}
    excluded: Counter = Counter()
    allowed = set()
    for t, c in df.items():
        if t in STOPWORDS:
            reason = "stopword"
        elif any(ch.isdigit() for ch in t):
            reason = "digit"
        elif len(t) < 3:
            reason = "short"
        elif t in special:
            reason = "colour_or_size"
        elif c < min_term_df:
            reason = "rare"
        elif c > max_term_share * n:
            reason = "common"
        elif t in brand_words:
            reason = "brand"
        else:
            allowed.add(t)
            continue
        excluded[reason] += 1
    return TermFilter(df, idf, frozenset(allowed), frozenset(brand_words), excluded)


def _common_root(paths: Sequence[Sequence[str]]) -> int:
    """How many leading levels every non-empty path shares (Beauty: 1, the root "Beauty")."""
    nonempty = [p for p in paths if p]
    if len(nonempty) < 2:
        return 0
    k = 0
    while all(len(p) > k + 1 and p[k] == nonempty[0][k] for p in nonempty):
        k += 1
    return k


@dataclass
class ItemAttributes:
    """One service's items as parallel lists (index = the item's row in this service).

    ``title`` is the item's title, or its keyword text when it has none: the document the leakage
    check retrieves, and what a critique must never contain.
    """

    service: str
    item_ids: list[str]
    title: list[str | None]
    path: list[tuple[str, ...]]  # category path without the service's common root
    brand: list[str | None]
    price: list[float | None]
    band: list[int | None]
    tokens: list[frozenset[str]]  # every word of the title
    terms: list[tuple[str, ...]]  # allowed terms among the title's first TITLE_WINDOW words, rarest first
    size: list[Size | None]
    pack: list[int | None]
    colour: list[str | None]
    terms_from: TermFilter
    band_cuts: dict[tuple[str, ...], list[float]]
    num_bands: int
    root: tuple[str, ...] = ()  # the category levels every item shares (removed from ``path``)
    row: dict[str, int] = field(default_factory=dict)
    # inverted indexes for the ambiguity guard: value -> rows
    by_leaf: dict[str, set[int]] = field(default_factory=dict)  # lower-case leaf category name
    by_brand: dict[str, set[int]] = field(default_factory=dict)
    by_term: dict[str, set[int]] = field(default_factory=dict)
    by_colour: dict[str, set[int]] = field(default_factory=dict)
    name_words: list[frozenset[str]] = field(default_factory=list)  # words of the category path and brand

    def __post_init__(self) -> None:
        self.row = {item: i for i, item in enumerate(self.item_ids)}
        self.name_words = [
            frozenset(w for level in (*path, brand or "") for w in words(level))
            for path, brand in zip(self.path, self.brand, strict=True)
        ]
        for i in range(len(self.item_ids)):
            if self.path[i]:
                self.by_leaf.setdefault(self.path[i][-1].lower(), set()).add(i)
            if self.brand[i]:
                self.by_brand.setdefault(brand_key(self.brand[i]), set()).add(i)
            for t in self.tokens[i]:
                self.by_term.setdefault(t, set()).add(i)
            if self.colour[i]:
                self.by_colour.setdefault(self.colour[i], set()).add(i)

    def __len__(self) -> int:
        return len(self.item_ids)

    def band_name(self, band: int | None) -> str | None:
        return None if band is None else BAND_NAMES[self.num_bands][band]

    def leaf(self, i: int) -> str | None:
        """The last level of the item's category path, or None."""
        return self.path[i][-1] if self.path[i] else None

    def department(self, i: int) -> str | None:
        """The first level below the common root, or None."""
        return self.path[i][0] if self.path[i] else None

    def coverage(self) -> dict[str, float]:
        """Share of items with each attribute (for stats.json)."""
        n = max(len(self), 1)

        def share(values: Sequence[object]) -> float:
            return round(sum(1 for v in values if v) / n, 4)

        return {
            "items": len(self),
            "title": share(self.title),
            "categories": share(self.path),
            "brand": share(self.brand),
            "price": share([p is not None for p in self.price]),
            "terms": share(self.terms),
            "size": share(self.size),
            "pack": share(self.pack),
            "colour": share(self.colour),
        }


def brand_key(brand: str) -> str:
    """Brands compared case- and punctuation-blind ("L'Oreal Paris" == "L'OREAL PARIS")."""
    return " ".join(words(brand))


def service_attributes(
    items: pa.Table,
    service: str,
    *,
    num_bands: int = 3,
    min_band_items: int = 20,
    min_term_df: int = 5,
    max_term_share: float = 0.05,
    brand_share: float = 0.5,
    leading_share: float = 0.5,
) -> ItemAttributes:
    """The attributes of ``service``'s items in a catalogue table (``ITEM_SCHEMA`` columns).

    Items keep the table's order. A missing column counts as missing values.
    """
    if num_bands not in BAND_NAMES:
        raise ValueError(f"num_bands must be one of {sorted(BAND_NAMES)}, got {num_bands}")
    rows = items.filter(pc.equal(items.column("service"), service))
    n = rows.num_rows

    def column(name: str) -> list:
        return rows.column(name).to_pylist() if name in rows.column_names else [None] * n

    item_ids = column("item_id")
    titles = [
        t if t and t.strip() else (k if k and k.strip() else None)
        for t, k in zip(column("title"), column("text"), strict=True)
    ]
    raw_paths = [tuple(c for c in (cats or []) if c) for cats in column("categories")]
    root = _common_root(raw_paths)
    paths = [p[root:] for p in raw_paths]
    no_brand = PLACEHOLDER_BRANDS | {""}
    brands = [b.strip() if b and brand_key(b) not in no_brand else None for b in column("brand")]
    prices = [float(p) if p is not None and math.isfinite(p) and p > 0 else None for p in column("price")]
    bands, cuts = price_bands(prices, paths, num_bands, min_band_items)
    terms_from = term_filter(
        titles,
        brands,
        min_term_df=min_term_df,
        max_term_share=max_term_share,
        brand_share=brand_share,
        leading_share=leading_share,
    )
    tokens = [frozenset(words(t)) for t in titles]
    idf = terms_from.idf
    head = [{w for w in words(t)[:TITLE_WINDOW] if w in terms_from.allowed} for t in titles]
    terms = [tuple(sorted(ws, key=lambda w: (-idf[w], w))) for ws in head]
    return ItemAttributes(
        service=service,
        item_ids=item_ids,
        title=titles,
        path=paths,
        brand=brands,
        price=prices,
        band=bands,
        tokens=tokens,
        terms=terms,
        size=[parse_size(t) for t in titles],
        pack=[parse_pack(t) for t in titles],
        colour=[parse_colour(t) for t in titles],
        terms_from=terms_from,
        band_cuts=cuts,
        num_bands=num_bands,
        root=raw_paths[0][:root] if root else (),
    )
