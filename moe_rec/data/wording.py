"""The wording of critiques and narratives: families of templates, as data.

**Critiques.** A critique is what a user says to steer from the item they were shown (the
previous item) to the one they want (the target). Each change it names is one *clause*, a full
sentence; a critique is an opener, one sentence per clause, and a closer. The clause keys, and the
placeholders each may use, are in :data:`CLAUSES` (``{brand}`` is the target's brand,
``{prev_brand}`` the previous item's; ``{band}`` the target's price band, "budget"; ``{terms}``
one or two distinctive words of the target, "argan and keratin"). No placeholder can carry an
item's title or id, and :func:`check_families` refuses any other placeholder.

The families are styled after the feature critiques (``CRI-F``) of the IARD dialogues
(``../shared/data/iard``): "a bit too scary for me", "Not a fan of Adam Sandler", "I'm looking for
something more along the lines of a feature release", "Do you have any other suggestions?",
"I'd prefer fantasy", "no not into that". Eight families, each in its own register; by default
``seen_it`` and ``terse`` are held out of training and validation (test only, see
``CritiqueConfig.held_out_families``), so a model can be tested on phrasings it never saw.

**Narratives.** A narrative says why an item suits a user: what the item is, why given the
history, and a one-line summary of the user's taste. A family is a list of templates over
``{what}``, ``{why}`` and ``{taste}`` plus the noun it calls the item; the phrases filling them
come from :data:`WHY` and :data:`TASTE`. ``bullets`` and ``friend`` are held out by default.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

# clause key -> placeholders it may use
CLAUSES: dict[str, frozenset[str]] = {
    "category": frozenset({"category", "prev_category"}),  # leaf category changes
    "brand": frozenset({"brand", "prev_brand"}),  # brand changes, both known
    "brand_only": frozenset({"brand"}),  # the target has a brand, the previous item none
    "cheaper": frozenset({"band"}),
    "pricier": frozenset({"band"}),
    "terms": frozenset({"terms"}),
    "bigger": frozenset(),
    "smaller": frozenset(),
    "bigger_pack": frozenset(),
    "smaller_pack": frozenset(),
    "colour": frozenset({"colour"}),
}


@dataclass(frozen=True)
class CritiqueFamily:
    """One register of critique: a phrasing list per clause key, openers and closers."""

    clauses: dict[str, tuple[str, ...]]
    openers: tuple[str, ...] = ("",)
    closers: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class NarrativeFamily:
    """One register of narrative: templates over ``{what}``, ``{why}``, ``{taste}``; ``noun`` names
    the item inside ``{what}`` ("a budget pick in lotions by Nivea")."""

    templates: tuple[str, ...]
    nouns: tuple[str, ...] = field(default=("pick",))


# fmt: off
CRITIQUE_FAMILIES: dict[str, CritiqueFamily] = {
    "prefer": CritiqueFamily(
        openers=("", "Hmm.", "Close, but not quite."),
        clauses={
            "category": ("I'd prefer something in {category}.", "I'd rather go for something from {category}."),
            "brand": ("I'd prefer {brand} over {prev_brand}.", "I'd rather have something by {brand} than {prev_brand}."),
            "brand_only": ("I'd prefer something by {brand}.", "I'd rather have a {brand} one."),
            "cheaper": ("I'd prefer something cheaper.", "I'd rather spend less, something in the {band} range."),
            "pricier": ("I'd prefer something a bit more upmarket.", "I'd rather have something in the {band} range, I don't mind paying more."),
            "terms": ("I'd prefer something with {terms}.", "I'd rather have something with {terms} in it."),
            "bigger": ("I'd prefer a bigger size.", "I'd rather have more of it."),
            "smaller": ("I'd prefer a smaller size.", "I'd rather have less of it."),
            "bigger_pack": ("I'd prefer a bigger pack.", "I'd rather buy a multi-pack."),
            "smaller_pack": ("I'd prefer a smaller pack.", "I'd rather not buy that many at once."),
            "colour": ("I'd prefer it in {colour}.", "I'd rather have a {colour} one."),
        },
        closers=("", " Any ideas?"),
    ),
    "not_a_fan": CritiqueFamily(
        clauses={
            "category": ("Not really into {prev_category}. Something in {category}?", "I'm not a fan of {prev_category}, more into {category}."),
            "brand": ("Not a fan of {prev_brand}. Anything by {brand}?", "I'm not really a {prev_brand} person, maybe {brand}?"),
            "brand_only": ("Not a fan of that brand. Anything by {brand}?", "Not keen on that brand, maybe {brand}?"),
            "cheaper": ("Not keen on the price. Anything cheaper?", "Not a fan of paying that much."),
            "pricier": ("Not a fan of the cheap stuff. Something more premium?", "Not keen on the bargain-bin ones, I'd pay more."),
            "terms": ("Not quite what I'm after, I want something with {terms}.", "Not a fan of that one, anything with {terms}?"),
            "bigger": ("Not a fan of the small sizes, a bigger one?", "Not enough in it for me."),
            "smaller": ("Not a fan of the big sizes, something smaller?", "Not keen on something that big."),
            "bigger_pack": ("Not a fan of buying one at a time, a bigger pack?", "Not enough in one pack for me."),
            "smaller_pack": ("I don't need that many, a smaller pack?", "Not keen on such a big pack."),
            "colour": ("Not a fan of that colour. Do you have it in {colour}?", "Not keen on the colour, {colour} maybe?"),
        },
    ),
    "too_much": CritiqueFamily(
        clauses={
            "category": ("That's a bit far from what I want, I was thinking {category}.", "{prev_category} is a bit too much for me, I was thinking {category}."),
            "brand": ("{prev_brand} is a bit too much for me, how about {brand}?", "That's a bit too {prev_brand} for me. {brand} instead?"),
            "brand_only": ("That brand is a bit too much for me, how about {brand}?", "A bit too unknown a brand for me, {brand} would be better."),
            "cheaper": ("That's a bit too pricey for me.", "A little too expensive for me, something in the {band} range?"),
            "pricier": ("That seems a bit too cheap for me, I want something better.", "A little too cheap for my liking, the {band} range is fine."),
            "terms": ("That's a bit too plain for me, I'd like something with {terms}.", "Too basic for me, something with {terms}?"),
            "bigger": ("That's a bit too small for me.", "A little too small for my liking."),
            "smaller": ("That's a bit too big for me.", "A little too much of it for me."),
            "bigger_pack": ("One is too few for me, a bigger pack would be better.", "Too few in there for me."),
            "smaller_pack": ("That's too many for me, a smaller pack?", "A little too much to buy at once."),
            "colour": ("That colour is a bit too much for me, {colour} would be better.", "Too loud a colour for me, {colour}?"),
        },
    ),
    "looking_for": CritiqueFamily(
        openers=("", "Not quite."),
        clauses={
            "category": ("I'm looking for something more along the lines of {category}.", "I was looking for something in {category}."),
            "brand": ("I was looking for something from {brand} rather than {prev_brand}.", "I'm looking for {brand}, not {prev_brand}."),
            "brand_only": ("I was looking for something from {brand}.", "I'm looking for a {brand} one."),
            "cheaper": ("I'm looking for something cheaper, more in the {band} range.", "I was looking for something less expensive."),
            "pricier": ("I'm looking for something a bit higher-end.", "I was looking for something more in the {band} range."),
            "terms": ("I'm looking for something with {terms}.", "I was looking for something more along the lines of {terms}."),
            "bigger": ("I'm looking for a bigger size.", "I was looking for something larger."),
            "smaller": ("I'm looking for something smaller.", "I was looking for a smaller size."),
            "bigger_pack": ("I'm looking for a multi-pack.", "I was looking for a bigger pack."),
            "smaller_pack": ("I'm looking for a smaller pack.", "I was looking for fewer in a pack."),
            "colour": ("I'm looking for one in {colour}.", "I was looking for something {colour}."),
        },
    ),
    "any_other": CritiqueFamily(
        openers=("", "Hmm, not that one.", "I've seen that one."),
        clauses={
            "category": ("Do you have anything in {category}?", "Any suggestions from {category}?"),
            "brand": ("Any other brand? Maybe {brand} instead of {prev_brand}?", "Do you have something by {brand} rather than {prev_brand}?"),
            "brand_only": ("Do you have anything by {brand}?", "Any suggestions from {brand}?"),
            "cheaper": ("Do you have anything cheaper?", "Any suggestions in the {band} range?"),
            "pricier": ("Do you have anything a bit more premium?", "Any suggestions in the {band} range?"),
            "terms": ("Do you have something with {terms}?", "Any suggestions with {terms}?"),
            "bigger": ("Do you have a bigger size?", "Any suggestions in a larger size?"),
            "smaller": ("Do you have a smaller one?", "Any suggestions in a smaller size?"),
            "bigger_pack": ("Do you have a bigger pack?", "Any multi-packs?"),
            "smaller_pack": ("Do you have a smaller pack?", "Any smaller packs?"),
            "colour": ("Do you have it in {colour}?", "Any suggestions in {colour}?"),
        },
        closers=("", " Any other suggestions?", " What else can you recommend?"),
    ),
    "more_like": CritiqueFamily(
        clauses={
            "category": ("Something more like {category}.", "More {category}, less {prev_category}."),
            "brand": ("Something more like {brand}, less {prev_brand}.", "More {brand}, less {prev_brand}."),
            "brand_only": ("Something more like {brand}.", "More of a {brand} thing."),
            "cheaper": ("Something more affordable.", "More like the {band} range."),
            "pricier": ("Something more high-end.", "More like the {band} range."),
            "terms": ("Something more like {terms}.", "More of a {terms} thing."),
            "bigger": ("Something bigger.", "More like a bigger size."),
            "smaller": ("Something smaller.", "More like a smaller size."),
            "bigger_pack": ("Something more like a multi-pack.", "More in the pack."),
            "smaller_pack": ("Something more like a single pack.", "Fewer in the pack."),
            "colour": ("Something more like {colour}.", "More of a {colour} one."),
        },
    ),
    "seen_it": CritiqueFamily(  # held out by default
        openers=("I have that one already.", "I've tried that one, it was okay.", "Already got that one."),
        clauses={
            "category": ("This time I want something in {category}.", "Now I need something from {category}."),
            "brand": ("This time I'd go with {brand} instead of {prev_brand}.", "Now I want to try {brand} rather than {prev_brand}."),
            "brand_only": ("This time I'd go with {brand}.", "Now I want to try {brand}."),
            "cheaper": ("This time I want to spend less.", "Now something in the {band} range."),
            "pricier": ("This time I want to treat myself to something pricier.", "Now something in the {band} range."),
            "terms": ("This time I want something with {terms}.", "Now I'm after {terms}."),
            "bigger": ("This time I want more of it, a bigger size.", "Now a bigger size."),
            "smaller": ("This time a smaller size is enough.", "Now a smaller size."),
            "bigger_pack": ("This time I'd stock up with a bigger pack.", "Now a multi-pack."),
            "smaller_pack": ("This time a smaller pack is enough.", "Now fewer in the pack."),
            "colour": ("This time I want it in {colour}.", "Now a {colour} one."),
        },
    ),
    "terse": CritiqueFamily(  # held out by default
        openers=("", "No.", "Nah.", "Not that."),
        clauses={
            "category": ("{category}?", "{category} instead."),
            "brand": ("{brand}, not {prev_brand}.", "{brand} instead."),
            "brand_only": ("{brand} please.", "{brand}?"),
            "cheaper": ("Cheaper.", "Cheaper please."),
            "pricier": ("Nicer one, price is fine.", "Fancier."),
            "terms": ("With {terms}.", "{terms}?"),
            "bigger": ("Bigger.", "Bigger one?"),
            "smaller": ("Smaller.", "Smaller one?"),
            "bigger_pack": ("Bigger pack.", "Multi-pack?"),
            "smaller_pack": ("Smaller pack.", "Fewer?"),
            "colour": ("In {colour}.", "{colour}?"),
        },
    ),
}

# narrative phrase banks: why (by the evidence found in the history) and taste (by what the
# history has); {things} ("another thing", "3 other things") and {times} ("once", "twice", "3
# times") are counts, never ids
WHY: dict[str, tuple[str, ...]] = {
    "same_leaf": ("you have bought {things} in {category}", "you keep coming back to {category}"),
    "same_brand": ("you have bought from {brand} {times} before", "you already like {brand}"),
    "same_department": ("you shop a lot in {department}", "{department} is a regular for you"),
    "shared_terms": ("you have bought other {terms} items", "your history has more {terms} items"),
    "none": ("it is a change from your usual picks", "it is something new for you to try"),
}
TASTE: dict[str, tuple[str, ...]] = {
    "categories_brand": ("mostly {categories}, often from {brand}", "{categories}, with a soft spot for {brand}"),
    "categories": ("mostly {categories}", "a lot of {categories}"),
    "terms": ("mostly {terms} things", "a lot of {terms}"),
    "varied": ("a bit of everything", "a varied mix"),
}

NARRATIVE_FAMILIES: dict[str, NarrativeFamily] = {
    "because": NarrativeFamily(
        templates=("Because {why}, here is {what}. Your taste: {taste}.",
                   "Because {why}: {what}. You like {taste}."),
        nouns=("pick", "choice"),
    ),
    "taste_first": NarrativeFamily(
        templates=("You go for {taste}. That is why {what} fits: {why}.",
                   "Your usual: {taste}. So here is {what}, since {why}."),
        nouns=("option", "pick"),
    ),
    "since": NarrativeFamily(
        templates=("Since {why}, you might like {what}. You tend to buy {taste}.",
                   "Since {why}, try {what}. Your taste runs to {taste}."),
        nouns=("find", "pick"),
    ),
    "what_first": NarrativeFamily(
        templates=("{what}. Why: {why}. You like {taste}.",
                   "{what}, picked because {why}. Taste: {taste}."),
        nouns=("pick", "product"),
    ),
    "bullets": NarrativeFamily(  # held out by default
        templates=("What: {what}. Why: {why}. Your taste: {taste}.",
                   "Item: {what}. Reason: {why}. Profile: {taste}."),
        nouns=("product", "item"),
    ),
    "friend": NarrativeFamily(  # held out by default
        templates=("Knowing you like {taste}, I'd go for {what}, since {why}.",
                   "Honestly, given your taste ({taste}), {what} is a safe bet: {why}."),
        nouns=("choice", "pick"),
    ),
}
# fmt: on

NARRATIVE_SLOTS = frozenset({"what", "why", "taste"})
WHY_SLOTS = frozenset({"things", "times", "category", "brand", "department", "terms"})
TASTE_SLOTS = frozenset({"categories", "brand", "terms"})


def placeholders(template: str) -> set[str]:
    """The ``{names}`` a template formats."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_families() -> None:
    """Raise ``ValueError`` when a family lacks a clause key or a template uses a placeholder it may
    not (so no template can ever format an item's title or id into a text)."""
    for name, fam in CRITIQUE_FAMILIES.items():
        missing = set(CLAUSES) - set(fam.clauses)
        extra = set(fam.clauses) - set(CLAUSES)
        if missing or extra:
            raise ValueError(
                f"critique family {name!r}: clauses missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        for key, phrasings in fam.clauses.items():
            if not phrasings:
                raise ValueError(f"critique family {name!r}: no phrasing for {key!r}")
            for text in phrasings:
                if bad := placeholders(text) - CLAUSES[key]:
                    raise ValueError(
                        f"critique family {name!r}, {key!r}: placeholder(s) {sorted(bad)} in {text!r}"
                    )
        for text in fam.openers + fam.closers:
            if placeholders(text):
                raise ValueError(f"critique family {name!r}: an opener or closer has a placeholder: {text!r}")
    for name, fam in NARRATIVE_FAMILIES.items():
        for text in fam.templates:
            if placeholders(text) != NARRATIVE_SLOTS:
                raise ValueError(
                    f"narrative family {name!r}: {text!r} must use exactly {sorted(NARRATIVE_SLOTS)}"
                )
    for bank, allowed in ((WHY, WHY_SLOTS), (TASTE, TASTE_SLOTS)):
        for key, phrasings in bank.items():
            for text in phrasings:
                if bad := placeholders(text) - allowed:
                    raise ValueError(f"narrative phrase {key!r}: placeholder(s) {sorted(bad)} in {text!r}")


check_families()
