"""How well a narrative fits the item it explains, and how varied narratives are (issue #19).

* **Consistency**: the narrative embedded with the SID stage's text encoder (MiniLM by default)
  ranks every item of the service by cosine with the items' text embeddings; the emitted item's
  rank gives MRR and Hit@10. A narrative that says nothing about its item ranks it like chance
  (MRR about ``ln(N) / N``).
* **Diversity**: distinct-n (distinct n-grams over all n-grams, whitespace words, n = 1, 2), and
  the share of narratives that are exactly another request's.
* **Faithfulness**: every brand, leaf category and price band a narrative names, found by
  searching it for the catalogue's own values (not by reading the templates that wrote the
  training narratives), checked against the explained item: precision and coverage.
* **Personalisation**: is a narrative closer (cosine of text embeddings) to its own user's history
  (the mean of the history items' text embeddings) than to other users' histories in the same
  service? An AUC over those other requests: 0.5 is not personalised, 1.0 always closer to its
  own user.
* **Self-BLEU**: each narrative's sentence BLEU-4 against all the others as references (high:
  the narratives say the same things), beside distinct-n.
* **Format validity**: a narrative is valid when the decoder ended it with ``[EOS]`` before the
  length cap, it is not empty, and its text holds nothing that is not text (special-token names,
  item ids, bytes that decode to no character).
* **BLEU-4 / ROUGE-L** against reference narratives: corpus BLEU-4 with the brevity penalty
  (Papineni et al. 2002; one reference each) and the mean ROUGE-L F1 (longest common
  subsequence, Lin 2004), over lower-cased word and punctuation tokens (:func:`words`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_rec.eval.critiques import ItemFacts


def consistency(
    narrative_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    items: Sequence[int],
    candidates: Sequence[torch.Tensor],
) -> dict[str, float]:
    """MRR and Hit@10 of each emitted item among its candidates when its narrative is the query.

    Args:
        narrative_vectors: (M, D) the narratives' embeddings.
        item_vectors: (N, D) every catalogue item's text embedding (SID-table rows).
        items: the M emitted items' table rows.
        candidates: per narrative, the table rows it is ranked among (its service's items).
    """
    reciprocal, hits = 0.0, 0.0
    queries = F.normalize(narrative_vectors.float(), dim=-1)
    keys = F.normalize(item_vectors.float(), dim=-1)
    for query, item, rows in zip(queries, items, candidates, strict=True):
        scores = keys[rows] @ query  # (C,)
        mine = scores[(rows == item).nonzero().flatten()[0]]
        rank = int((scores > mine).sum()) + 1  # ties count in the item's favour
        reciprocal += 1.0 / rank
        hits += float(rank <= 10)
    n = max(len(items), 1)
    return {"mrr": reciprocal / n, "hit@10": hits / n}


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1, distinct-2 (over whitespace words of all texts) and the share of texts that
    another text repeats exactly."""
    out = {}
    for n in (1, 2):
        grams = sum((ngrams(t.split(), n) for t in texts), Counter())
        total = sum(grams.values())
        out[f"distinct-{n}"] = len(grams) / total if total else 0.0
    counts = Counter(texts)
    out["repeated"] = sum(c for c in counts.values() if c > 1) / len(texts) if texts else 0.0
    return out


def _words(text: str) -> str:
    """Lower-case words joined by single spaces, with spaces around (for whole-word search)."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def mentions(text: str, phrases: Iterable[str]) -> set[str]:
    """The ``phrases`` (lower-case words) that ``text`` names as whole words; a phrase found only
    inside a longer found one ("food" in "baby food") is not counted."""
    found: list[str] = []
    words = _words(text)
    for phrase in sorted({_words(p).strip() for p in phrases if _words(p).strip()}, key=len, reverse=True):
        if f" {phrase} " in words and not any(f" {phrase} " in f" {longer} " for longer in found):
            found.append(phrase)
    return set(found)


def faithfulness(
    texts: Sequence[str],
    facts: Sequence[Mapping[str, str | None]],
    vocab: Sequence[Mapping[str, set[str]]],
    history: Sequence[Mapping[str, set[str]]] | None = None,
) -> dict[str, float]:
    """Precision and coverage of what narratives name about their item, read with the catalogue's
    own values, not the templates: for each kind (``brand``, ``category``, ``band``), the values of
    ``vocab`` a narrative names (:func:`mentions`) against its item's value in ``facts``.

    Args:
        texts: the narratives.
        facts: per narrative, its item's value of each kind (None: the item has none).
        vocab: per narrative, every value of each kind in its service's catalogue.
        history: per narrative, the values of each kind among the user's history items (a
            narrative may say what the user bought as well as what the item is).

    Returns:
        ``precision`` (named values that are the item's, over all named values), ``coverage``
        (the item's values that are named, over those it has), ``mentions`` per narrative; with
        ``history`` also ``grounded`` (named values that are the item's or a history item's, over
        all named values: the rest is made up).
    """
    named = right = known = covered = grounded = 0
    for i, (text, fact, values) in enumerate(zip(texts, facts, vocab, strict=True)):
        for kind, options in values.items():
            said = mentions(text, options)
            truth = _words(fact[kind]).strip() if fact.get(kind) else None
            named += len(said)
            right += truth in said
            known += truth is not None
            covered += truth is not None and truth in said
            if history is not None:
                held = {_words(v).strip() for v in history[i].get(kind, ())} | {truth}
                grounded += len(said & held)
    out = {
        "precision": right / named if named else math.nan,
        "coverage": covered / known if known else math.nan,
        "mentions": named / len(texts) if texts else 0.0,
    }
    if history is not None:
        out["grounded"] = grounded / named if named else math.nan
    return out


def narrative_facts(
    facts: ItemFacts, services: Sequence[str], service_rows: Mapping[str, torch.Tensor], rows: Sequence[int]
) -> tuple[list[dict[str, str | None]], list[dict[str, set[str]]]]:
    """For :func:`faithfulness`: the brand, leaf category and price band of the items at table
    ``rows`` (of ``services``), and every such value of each one's service.

    Args:
        facts: the catalogue's facts (:func:`moe_rec.eval.critiques.item_facts`).
        services: the service of each of ``rows``.
        service_rows: every table row of each service, (N_s,).
        rows: the explained items' table rows.
    """
    vocab = {
        s: {
            "brand": {facts.brand[r] for r in all_rows.tolist() if facts.brand[r]},
            "category": {facts.leaf[r] for r in all_rows.tolist() if facts.leaf[r]},
            "band": set(facts.band_names[s]),
        }
        for s, all_rows in service_rows.items()
    }
    own = [item_facts_of(facts, r) for r in rows]
    return own, [vocab[s] for s in services]


def item_facts_of(facts: ItemFacts, row: int) -> dict[str, str | None]:
    """The brand, leaf category and price band of the item at table ``row`` (None where it has none)."""
    return {"brand": facts.brand[row], "category": facts.leaf[row], "band": facts.band[row]}


def history_facts(facts: ItemFacts, histories: Sequence[Sequence[int]]) -> list[dict[str, set[str]]]:
    """For :func:`faithfulness`'s ``history``: per narrative the brands, leaf categories and price
    bands of its user's history items (table rows)."""
    out = []
    for rows in histories:
        held: dict[str, set[str]] = {"brand": set(), "category": set(), "band": set()}
        for r in rows:
            for kind, value in item_facts_of(facts, r).items():
                if value:
                    held[kind].add(value)
        out.append(held)
    return out


def personalisation(
    narrative_vectors: torch.Tensor,
    history_vectors: torch.Tensor,
    users: Sequence[str],
    groups: Sequence[str] | None = None,
) -> float:
    """How much more a narrative is like its own user's history than like other users': per
    request, the share of the other users' requests (of the same group, e.g. service, when
    ``groups`` is given) whose history is less similar (cosine) to the narrative than its own
    history (a tie counts half), averaged over the requests that have any to compare with (NaN:
    none has). Requests of the same user are not compared (their histories overlap); comparing
    within a service keeps "names the right service" from counting as personal.

    Args:
        narrative_vectors: (M, D) the narratives' embeddings.
        history_vectors: (M, D) each request's history embedding (the mean of its items').
        users: the M requests' users.
        groups: the M requests' groups (None: one group).
    """
    sims = F.normalize(narrative_vectors.float(), dim=-1) @ F.normalize(history_vectors.float(), dim=-1).T
    own = sims.diagonal()  # (M,) narrative i against its own history
    user, group = _labels(users), _labels(groups if groups is not None else [""] * len(users))
    other = (user[None, :] != user[:, None]) & (
        group[None, :] == group[:, None]
    )  # (M, M) j to compare i with
    wins = ((sims < own[:, None]).float() + 0.5 * (sims == own[:, None]).float()) * other
    counted = other.sum(1)
    per_request = wins.sum(1)[counted > 0] / counted[counted > 0]
    return float(per_request.mean()) if len(per_request) else math.nan


def _labels(names: Sequence[str]) -> torch.Tensor:
    """Names as integer labels (equal names, equal labels)."""
    ids = {u: i for i, u in enumerate(dict.fromkeys(names))}
    return torch.tensor([ids[u] for u in names], dtype=torch.long)


def words(text: str) -> list[str]:
    """BLEU / ROUGE tokens: lower-case runs of letters and digits, each other non-space character
    alone ("Why: it's new." -> why : it ' s new .)."""
    return re.findall(r"[^\W_]+|[^\w\s]|_", text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the ``n``-grams of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> dict[str, float]:
    """Corpus BLEU (Papineni et al. 2002) with one reference per hypothesis: the geometric mean of
    the clipped n-gram precisions (n = 1 .. ``max_n``, each summed over the corpus) times the
    brevity penalty ``exp(1 - r / c)`` when the hypotheses' total length ``c`` is below the
    references' ``r``; 0 when some precision is 0. No smoothing.

    Returns:
        ``bleu``, ``bp``, ``ratio`` (c / r) and ``p1`` .. ``p{max_n}``.
    """
    matched, total = [0] * max_n, [0] * max_n
    for hyp, ref in zip(hypotheses, references, strict=True):
        for n in range(1, max_n + 1):
            mine, theirs = ngrams(hyp, n), ngrams(ref, n)
            matched[n - 1] += sum(min(c, theirs[g]) for g, c in mine.items())
            total[n - 1] += sum(mine.values())
    c, r = sum(len(h) for h in hypotheses), sum(len(x) for x in references)
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    precisions = [m / t if t else 0.0 for m, t in zip(matched, total, strict=True)]
    score = bp * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": score, "bp": bp, "ratio": c / r if r else math.nan} | {
        f"p{n}": p for n, p in enumerate(precisions, 1)
    }


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)  # row[j]: the LCS of the prefix of a read so far and b[:j]
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 (Lin 2004, beta = 1): the harmonic mean of LCS / len(hypothesis) and
    LCS / len(reference); 0 when they share nothing."""
    lcs = lcs_length(hypothesis, reference)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def self_bleu(texts: Sequence[Sequence[str]], max_n: int = 4, epsilon: float = 0.1) -> float:
    """The mean sentence BLEU-``max_n`` of each text against all the others as its references
    (Zhu et al. 2018, Texygen): n-gram counts clipped by their largest count in any other text, the
    brevity penalty against the other text closest in length (the shorter on a tie), and a zero
    precision taken as ``epsilon`` over its n-gram count (NLTK's smoothing "method1") unless no
    word matches at all (then 0). 1.0: every text is another's; NaN with fewer than two texts."""
    if len(texts) < 2:
        return math.nan
    counts = [[ngrams(t, n) for n in range(1, max_n + 1)] for t in texts]
    best = [_top_two(c[n] for c in counts) for n in range(max_n)]  # per n: gram -> top two (count, text)
    lengths = Counter(len(t) for t in texts)
    scores = []
    for i, text in enumerate(texts):
        logs = []
        for n in range(max_n):
            mine = counts[i][n]
            match = sum(min(c, _max_other(best[n][g], i)) for g, c in mine.items())
            if n == 0 and not match:
                break
            logs.append(math.log((match or epsilon) / max(sum(mine.values()), 1)))
        if len(logs) < max_n:
            scores.append(0.0)
            continue
        others = lengths - Counter([len(text)])
        ref = min(+others, key=lambda r: (abs(r - len(text)), r))
        bp = 1.0 if len(text) > ref else math.exp(1 - ref / len(text))
        scores.append(bp * math.exp(sum(logs) / max_n))
    return sum(scores) / len(scores)


def _top_two(per_text: Iterable[Counter]) -> dict[tuple, list[tuple[int, int]]]:
    """For every n-gram, its two largest counts over the texts, as ``(count, text index)``."""
    top: dict[tuple, list[tuple[int, int]]] = {}
    for i, grams in enumerate(per_text):
        for g, c in grams.items():
            top[g] = sorted([*top.get(g, []), (c, i)], reverse=True)[:2]
    return top


def _max_other(top: list[tuple[int, int]], i: int) -> int:
    """The largest count of an n-gram in a text other than ``i``, from its :func:`_top_two`."""
    return next((c for c, j in top if j != i), 0)


LEAK_PATTERN = re.compile(
    r"\[(?:pad|bos|eos|sep|unk|critique|explain|reserved\d*|svc|c\d+|dedup|text)\b|\ufffd"
)


def leaks(text: str, item_ids: Collection[str]) -> list[str]:
    """What in a narrative is not text: a special or item token's name (``[EOS]``, ``[c2:17]``),
    a catalogue item id as a word (``item_ids`` lower-case), or U+FFFD (subword bytes that decode
    to no character)."""
    found = LEAK_PATTERN.findall(text.lower())
    return found + [w for w in re.findall(r"[a-z0-9_\-]+", text.lower()) if w in item_ids]


def format_validity(
    lengths: Sequence[int], texts: Sequence[str], max_tokens: int, item_ids: Collection[str]
) -> dict[str, float]:
    """Shares of narratives that ended with ``[EOS]`` (the decoder stops there, so fewer than
    ``max_tokens`` subwords were written), are not empty, and have no :func:`leaks`; ``valid``:
    all three.

    Args:
        lengths: each narrative's subword count (without ``[EOS]``).
        texts: the decoded narratives.
        max_tokens: the decoder's cap.
        item_ids: the catalogue's item ids, lower-case.
    """
    ended = [n < max_tokens for n in lengths]
    nonempty = [bool(t.strip()) for t in texts]
    clean = [not leaks(t, item_ids) for t in texts]
    m = max(len(texts), 1)
    return {
        "valid": sum(map(all, zip(ended, nonempty, clean, strict=True))) / m,
        "ended": sum(ended) / m,
        "nonempty": sum(nonempty) / m,
        "clean": sum(clean) / m,
    }


def against_references(texts: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (with its brevity penalty and length ratio) and mean ROUGE-L F1 of ``texts``
    against one reference each, over :func:`words`."""
    hyps, refs = [words(t) for t in texts], [words(t) for t in references]
    bleu = corpus_bleu(hyps, refs)
    rouge = sum(rouge_l(h, r) for h, r in zip(hyps, refs, strict=True)) / max(len(hyps), 1)
    return {"bleu": bleu["bleu"], "rouge_l": rouge, "bp": bleu["bp"], "ratio": bleu["ratio"]}
