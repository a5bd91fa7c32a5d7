"""Sentences that ask for nothing, from real dialogues: the IARD seekers' small talk, for
``sequences.text.distractors``.

A critique a user types often carries a sentence that asks for nothing ("Hi, can you help me?",
"thanks, I'll check it out"); a model trained only on our wording families reads such a sentence
as part of the ask. This writes the seeker turns of the IARD dialogues (``../shared/data/iard``)
whose intents are all in ``--intents`` (default: other, inquiry about the recommender's offer,
accept; never a critique, a rejection, or "seen it"), one sentence a line, without movie mentions,
2 to 16 words, deduplicated. A sentence sharing any three-word sequence with a held-out critique
family's templates (``critiques.held_out_families``, placeholders taken out) is left out and
counted, so the held-out wordings stay unseen; so is a sentence with any of ``--exclude-words``
(default: the words of having seen or owned an item already, what the held-out ``seen_it`` family
says), so its meaning stays unseen too.

    python tools/iard_distractors.py --iard ../shared/data/iard/iard.json --out runs/iard-distractors.txt
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from moe_rec.data.critique_config import CritiqueConfig
from moe_rec.data.wording import CRITIQUE_FAMILIES

INTENTS = ("OTH", "IQU", "ACC")
EXCLUDE_WORDS = ("seen", "saw", "watched", "already", "tried", "got", "have", "own")
WORD = re.compile(r"[a-z']+")


def trigrams(text: str) -> set[tuple[str, ...]]:
    """Lower-cased word three-grams of ``text``."""
    words = WORD.findall(text.lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def held_out_trigrams(families: Iterable[str]) -> set[tuple[str, ...]]:
    """Every three-gram of the named critique families' clauses, openers and closers, each
    ``{placeholder}`` taken out first (it is filled with item words, not wording)."""
    grams: set[tuple[str, ...]] = set()
    for name in families:
        family = CRITIQUE_FAMILIES[name]
        texts = [*family.openers, *family.closers, *(t for ts in family.clauses.values() for t in ts)]
        for text in texts:
            grams |= trigrams(re.sub(r"\{[a-z_]+\}", " ", text))
    return grams


def distractors(
    dialogues: dict, intents: Sequence[str], held_out: set[tuple[str, ...]], exclude: Iterable[str] = ()
) -> tuple[list[str], Counter[str]]:
    """(sentences, counts of what was kept and left out) from the IARD ``dialogues``."""
    counts: Counter[str] = Counter()
    excluded = set(exclude)
    found: dict[str, str] = {}  # lower case -> the sentence as written
    for dialogue in dialogues.values():
        for turn in dialogue["dialogue_info"].values():
            if turn["role"] != "seeker":
                continue
            counts["seeker_turns"] += 1
            if not set(turn["sub-intent/action"]) <= set(intents):
                counts["other_intent"] += 1
                continue
            for sentence in re.split(r"\.{2,}|(?<=[.!?])\s+", turn["utterance_text"]):
                sentence = " ".join(sentence.split())
                if not sentence:  # between two separators
                    continue
                if "@" in sentence:
                    counts["movie_mention"] += 1
                elif not 2 <= len(sentence.split()) <= 16:
                    counts["length"] += 1
                elif trigrams(sentence) & held_out:
                    counts["held_out_overlap"] += 1
                elif excluded & set(WORD.findall(sentence.lower())):
                    counts["excluded_word"] += 1
                elif sentence.lower() in found:
                    counts["duplicate"] += 1
                else:
                    found[sentence.lower()] = sentence
    counts["kept"] = len(found)
    return list(found.values()), counts


def main(argv: Sequence[str] | None = None) -> Counter[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iard", type=Path, required=True, help="iard.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--intents", nargs="+", default=list(INTENTS))
    parser.add_argument("--exclude-words", nargs="*", default=list(EXCLUDE_WORDS))
    parser.add_argument("--held-out", nargs="+", default=CritiqueConfig().held_out_families,
                        help="critique families whose wording must stay unseen")  # fmt: skip
    args = parser.parse_args(argv)
    unknown = sorted(set(args.held_out) - set(CRITIQUE_FAMILIES))
    if unknown:
        raise SystemExit(
            f"error: --held-out: unknown famil(ies) {unknown}; known: {sorted(CRITIQUE_FAMILIES)}"
        )
    try:
        dialogues = json.loads(args.iard.read_text(encoding="utf-8"))
        sentences, counts = distractors(
            dialogues, args.intents, held_out_trigrams(args.held_out), args.exclude_words
        )
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {args.iard}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {args.iard}: not IARD dialogues ({e!r} missing)") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(f"{s}\n" for s in sentences), encoding="utf-8")
    print(
        f"wrote {len(sentences):,} sentences to {args.out}; "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    )
    return counts


if __name__ == "__main__":
    main()
