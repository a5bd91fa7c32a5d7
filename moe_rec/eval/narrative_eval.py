"""The steps of ``moe-rec eval --narratives`` that read requests, the catalogue and the composed
narratives: the items' titles (a calibration text), the personalisation of a request's narrative
against other users' histories, and the narration of held-out-family targets scored against their
references beside the baselines (:mod:`moe_rec.eval.narrative_metrics` holds the measures,
:mod:`moe_rec.eval.narrative_references` the references and baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_rec.data.critiques import load_rows
from moe_rec.data.sequences import user_bucket
from moe_rec.eval.exact import request_history_rows
from moe_rec.eval.narrate import narrative_prompt, narrative_text, write_narratives
from moe_rec.eval.narrative_metrics import against_references, personalisation
from moe_rec.eval.narrative_references import (
    held_out_requests,
    nearest_item_narratives,
    users_last_narratives,
)


def item_titles(items: Any) -> dict[tuple[str, str], str]:
    """Every catalogue item's title ("" where it has none) by ``(service, item id)``."""
    columns = (items.column(c).to_pylist() for c in ("service", "item_id", "title"))
    return {(s, str(i)): t or "" for s, i, t in zip(*columns, strict=True)}


def request_personalisation(
    rows: list[dict], vocab: Any, table: Any, item_vectors: Any, narrative_vectors: Any, title_vectors: Any
) -> dict[str, float]:
    """Personalisation AUC of the narratives and, for calibration, of the explained items' titles
    (an item recommended from the history is itself like the history), against the other users'
    requests of the same service: each request's history is the mean text embedding of its items
    in the asked service (what the training narratives describe); requests with none there are
    left out (``personal_requests``: those kept)."""
    kept, history = [], []
    for i, r in enumerate(rows):
        seen = request_history_rows(r, vocab, table)
        if seen:
            kept.append(i)
            history.append(item_vectors[seen].float().mean(0))
    if not kept:
        return {"personal_auc": float("nan"), "title_personal_auc": float("nan"), "personal_requests": 0}
    users, services = [rows[i]["user"] for i in kept], [rows[i]["service"] for i in kept]
    stacked = torch.stack(history)
    return {
        "personal_auc": personalisation(narrative_vectors[kept], stacked, users, services),
        "title_personal_auc": personalisation(title_vectors[kept], stacked, users, services),
        "personal_requests": len(kept),
    }


def score_references(
    narratives_dir: Path,
    split: str,
    requests: Any,
    limit: int,
    model: Any,
    table: Any,
    vocab: Any,
    tokenizer: Any,
    item_vectors: Any,
    title: dict[tuple[str, str], str],
) -> dict[str, Any]:
    """BLEU-4 / ROUGE-L of the model's narratives of the targets of the first ``limit`` requests of
    ``split`` with a held-out-family reference narrative in ``narratives_dir``
    (:mod:`moe_rec.eval.narrative_references`), beside the target's title, the nearest training
    narrative by item and the user's last training narrative (the nearest-item one where the user
    has none)."""
    if limit <= 0 or not (narratives_dir / f"{split}.parquet").exists():
        return {"requests": 0}  # none asked for, or no narratives built (critiques.narratives.enabled off)
    found = held_out_requests(requests, load_rows(narratives_dir, split).to_list(), limit)
    if not found:
        return {"requests": 0}
    rows, refs = [r for r, _ in found], [text for _, text in found]
    targets = table.rows([r["service"] for r in rows], [r["target_item"] for r in rows]).tolist()
    prompts = [
        narrative_prompt(r, vocab.item_tokens(r["service"], table.codes[t].tolist()), vocab)
        for r, t in zip(rows, targets, strict=True)
    ]
    users = [user_bucket(r["user"], model.config.num_user_buckets) for r in rows]
    texts = [narrative_text(tokenizer, ids) for ids in write_narratives(model, prompts, users, vocab)]
    train = load_rows(narratives_dir, "train").select_columns(
        ["user", "service", "position", "target_item", "text"]
    ).to_list()  # fmt: skip
    train_rows = table.rows([t["service"] for t in train], [t["target_item"] for t in train]).tolist()
    nearest = nearest_item_narratives(
        targets, train_rows, [t["text"] for t in train], item_vectors, table.service_index
    )
    nearest = [n or "" for n in nearest]
    users_last = users_last_narratives(rows, train)
    baselines = {
        "model": texts,
        "title": [title[(r["service"], r["target_item"])] for r in rows],
        "nearest_item": nearest,
        "user_last": [u if u is not None else n for u, n in zip(users_last, nearest, strict=True)],
    }
    scored: dict[str, Any] = {k: against_references(v, refs) for k, v in baselines.items()}
    scored |= {"requests": len(rows), "user_last_found": sum(u is not None for u in users_last) / len(rows)}
    scored["examples"] = [
        {"reference": ref, "narrative": t} for ref, t in list(zip(refs, texts, strict=True))[:3]
    ]
    return scored
