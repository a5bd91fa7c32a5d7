"""What a trained item-level model gives away about the histories it was trained on: a
membership-inference attack and the exposure of planted canaries (``moe-rec audit``).

**Membership inference.** ``sequences.holdout_users`` (:mod:`moe_rec.data.holdout`) keeps a
stable-hash share of the users out of training and writes the windows they would have had to
``sequences/holdout/``. Members are users with a training window (planted canaries left out), an
equal-size random sample of them. Each user is scored on one window, the latest (the one training
saw last; the windows of a user with fewer than ``max_events`` training events are prefixes of it,
and a causal model predicts their positions alike): at every position the model ranks every item
of the next event's service exactly, as evaluation does (:func:`~moe_rec.eval.exact.ranks_for_requests`),
and the user's scores are the mean over positions of

* ``loss`` — the cross-entropy of a softmax over the service's items, the exact scores as logits;
* ``rank`` — log2 of the true next item's rank.

The attack calls a user a member when the score is low; its AUC is the probability that a random
member scores lower than a random non-member (ties half), 0.5 for a model that behaves alike on
both, with a percentile bootstrap interval over users. Members and non-members are users drawn by
the same hash from one population, so any gap is the model's doing (memorisation, or generalisation
that is worse on strangers). :func:`auc` is checked against a plain pairwise loop in the tests.

**Canary exposure** (Carlini et al., "The Secret Sharer", 2019). ``sequences.canaries``
(:mod:`moe_rec.data.canaries`) plants random ``context -> item`` patterns as the histories of a few
synthetic users and draws as many controls the same way, never planted. The model is asked for
the service's next item after each context (an anonymous request: no user key), and the pattern's
item is ranked among all N items of the service: exposure = log2(N) - log2(rank), from 0 (ranked
last) to log2(N) (ranked first). Controls show what chance gives (about 1.44 bits for a uniform
rank); the planted canaries' excess over it is what the model memorised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from moe_rec.console import progress
from moe_rec.data.canaries import Canary, is_canary_user, read_canaries
from moe_rec.data.holdout import HOLDOUT_SPLIT
from moe_rec.data.positions import item_batch
from moe_rec.data.schema import DataError
from moe_rec.data.sequences import IGNORE_INDEX, prompt
from moe_rec.eval.exact import (
    ServiceCatalogue,
    position_log_probs,
    ranks_for_requests,
    request_log_probs,
)
from moe_rec.model import MoERecForItemPrediction
from moe_rec.sid.table import SIDTable

ATTACKS = ("loss", "rank")  # per-user scores; lower reads as "member"


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half: the Mann-Whitney U
    statistic over ``len(positive) x len(negative)``, from average ranks (O(n log n))."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(positive) or not len(negative):
        return math.nan
    scores = np.concatenate([positive, negative])
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    average = first + (counts + 1) / 2  # 1-based average rank of a tied group
    rank_sum = average[inverse[: len(positive)]].sum()
    u = rank_sum - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def bootstrap_auc(
    positive: np.ndarray, negative: np.ndarray, rounds: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of :func:`auc` over ``rounds`` resamples of each group with replacement."""
    if rounds < 1 or not len(positive) or not len(negative):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    positive, negative = np.asarray(positive), np.asarray(negative)
    draws = [
        auc(positive[rng.integers(len(positive), size=len(positive))], negative[rng.integers(len(negative), size=len(negative))])
        for _ in range(rounds)
    ]  # fmt: skip
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def exposure(rank: int | np.ndarray, n: int | np.ndarray) -> float | np.ndarray:
    """log2(n) - log2(rank): 0 for the last of n items, log2(n) for the first."""
    return np.log2(n) - np.log2(rank)


def latest_windows(rows: datasets.Dataset, users: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each user's first window in file order (the sequences stage writes a user's windows latest
    first), for ``users`` only when given; planted canaries' users are left out."""
    names = rows["user"]
    first: dict[str, int] = {}
    for i, user in enumerate(names):
        if user not in first and not is_canary_user(user):
            first[user] = i
    wanted = list(first) if users is None else [u for u in users if u in first]
    picked = rows.select([first[u] for u in wanted]).to_list()
    return dict(zip(wanted, picked, strict=True))


@torch.no_grad()
def window_scores(
    model: MoERecForItemPrediction,
    table: SIDTable,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 32,
    catalogue: ServiceCatalogue | None = None,
    description: str = "windows",
) -> dict[str, np.ndarray]:
    """Teacher-forced exact scores of training windows (``train`` / ``holdout`` rows, with
    ``labels``): per row the number of scored positions and the mean over them of the loss and of
    log2 of the rank of the next item among its service's items. Returns arrays (len(rows),)."""
    vocab = table.vocabulary()
    catalogue = catalogue or ServiceCatalogue(table, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    vectors = model.item_table()  # (N, D') or None
    out = {k: np.zeros(len(rows)) for k in ("positions", *ATTACKS)}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding
    with progress() as bar:
        task = bar.add_task(f"audit {description}", total=len(rows))
        for start in range(0, len(rows), batch_size):
            index = order[start : start + batch_size]
            batch = item_batch([rows[i] for i in index], vocab, model.config.num_user_buckets)
            labels = batch.pop("labels")[:, 1:]  # (B, T-1, P): position t predicts event t + 1
            log_probs, query, own = position_log_probs(model, batch)  # (B, T, P, K)
            b, t = (labels[..., 0] != IGNORE_INDEX).nonzero(as_tuple=True)  # (M,) scored positions
            asked = batch["item_tokens"][b, t + 1, 0] - vocab.service_offset  # (M,) next event's service
            services = [vocab.services[s] for s in asked.tolist()]
            targets = table.rows_for_codes(services, labels[b, t])
            ranks, losses = ranks_for_requests(
                log_probs[b, t], services, targets, catalogue,
                query[b, t] if query is not None else None, vectors,
                (own[0][b, t], own[1][b, t]) if own is not None else None,
            )  # fmt: skip
            for j, i in enumerate(index):
                mine = b == j
                out["positions"][i] = int(mine.sum())
                out["loss"][i] = float(losses[mine].double().mean())
                out["rank"][i] = float(torch.log2(ranks[mine].double()).mean())
            bar.advance(task, len(index))
    model.train(was_training)
    return out


def _load_split(sequences_dir: Path, split: str) -> datasets.Dataset | None:
    files = sorted(str(p) for p in (Path(sequences_dir) / split).glob("part-*.parquet"))
    return datasets.Dataset.from_parquet(files) if files else None


def membership_audit(
    model: MoERecForItemPrediction,
    table: SIDTable,
    train: datasets.Dataset,
    holdout: datasets.Dataset,
    *,
    seed: int = 0,
    rounds: int = 1000,
    max_users: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """The loss and rank attacks' AUC (members against held-out users) with bootstrap intervals."""
    rng = np.random.default_rng(seed)
    non_members = latest_windows(holdout)
    names = sorted(non_members)
    if max_users and len(names) > max_users:
        names = sorted(rng.choice(names, size=max_users, replace=False).tolist())
    members_all = sorted({u for u in train["user"] if not is_canary_user(u)})
    size = min(len(names), len(members_all))
    chosen = sorted(rng.choice(members_all, size=size, replace=False).tolist())
    members = latest_windows(train, chosen)
    catalogue = ServiceCatalogue(table, next(model.parameters()).device)
    scored = {
        "members": window_scores(model, table, list(members.values()), batch_size=batch_size,
                                 catalogue=catalogue, description="members"),
        "non_members": window_scores(model, table, [non_members[u] for u in names], batch_size=batch_size,
                                     catalogue=catalogue, description="non-members"),
    }  # fmt: skip
    report: dict[str, Any] = {
        "members": len(members),
        "non_members": len(names),
        "members_available": len(members_all),
        "positions": {g: int(s["positions"].sum()) for g, s in scored.items()},
    }
    for attack in ATTACKS:  # a member is called when the score is low: the AUC of -score
        m, n = -scored["members"][attack], -scored["non_members"][attack]
        low, high = bootstrap_auc(m, n, rounds=rounds, seed=seed)
        report[attack] = {
            "auc": auc(m, n),
            "ci95": [low, high],
            "members_mean": float(scored["members"][attack].mean()) if len(m) else math.nan,
            "non_members_mean": float(scored["non_members"][attack].mean()) if len(n) else math.nan,
        }
    return report


@torch.no_grad()
def canary_exposure(
    model: MoERecForItemPrediction, table: SIDTable, canaries: Sequence[Canary]
) -> dict[str, Any]:
    """Rank and exposure of each pattern's item after its context, among all items of its service."""
    if not canaries:
        return {"count": 0}
    vocab = table.vocabulary()
    catalogue = ServiceCatalogue(table, next(model.parameters()).device)
    requests = [
        {"user": "", "service": c.service,
         **prompt(vocab, [(c.service, codes) for codes in table.codes_for(c.service, list(c.context)).tolist()], c.service)}
        for c in canaries
    ]  # fmt: skip
    was_training = model.training
    model.eval()
    log_probs, query, own = request_log_probs(
        model, item_batch(requests, vocab, model.config.num_user_buckets, left_pad=True)
    )
    services = [c.service for c in canaries]
    targets = torch.from_numpy(table.rows(services, [c.item for c in canaries])).long()
    ranks, _ = ranks_for_requests(log_probs, services, targets, catalogue, query, model.item_table(), own)
    model.train(was_training)
    sizes = np.asarray([len(catalogue.rows[s]) for s in services])
    exposures = exposure(ranks.numpy(), sizes)
    return {
        "count": len(canaries),
        "exposure_mean": float(exposures.mean()),
        "exposure_median": float(np.median(exposures)),
        "exposure_max": float(np.log2(sizes).mean()),  # log2(N): the item ranked first
        "ranks": ranks.tolist(),
        "exposures": [round(float(e), 4) for e in exposures],
        "items": sizes.tolist(),
    }


def run_audit(
    model: MoERecForItemPrediction,
    table: SIDTable,
    sequences_dir: Path,
    *,
    seed: int = 0,
    rounds: int = 1000,
    max_users: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Every audit the run's sequences allow: membership inference (with a ``holdout`` split) and
    canary exposure (with ``canaries.json``).

    Raises:
        DataError: a token-level model, or sequences with neither held-out users nor canaries.
    """
    if not isinstance(model, MoERecForItemPrediction):
        raise DataError(
            "the audit scores the item-level model (model.kind: item) exactly; this is a token-level one"
        )
    holdout = _load_split(sequences_dir, HOLDOUT_SPLIT)
    canaries = read_canaries(sequences_dir)
    if holdout is None and canaries is None:
        raise DataError(
            f"nothing to audit in {sequences_dir}: build the sequences with sequences.holdout_users=0.1 "
            "(membership inference) and/or sequences.canaries.count=8 (exposure), then train"
        )
    report: dict[str, Any] = {}
    if holdout is not None:
        train = _load_split(sequences_dir, "train")
        if train is None:
            raise DataError(f"no train samples in {Path(sequences_dir) / 'train'}; build the sequences first")
        report["membership"] = membership_audit(
            model, table, train, holdout, seed=seed, rounds=rounds, max_users=max_users, batch_size=batch_size
        )
    if canaries is not None:
        planted, controls = canaries
        report["canaries"] = {
            "planted": canary_exposure(model, table, planted),
            "controls": canary_exposure(model, table, controls),
        }
    return report
