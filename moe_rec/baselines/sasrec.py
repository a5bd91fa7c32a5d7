"""SASRec (Kang & McAuley, 2018) trained with full softmax cross-entropy, one model per service.

The model follows the reference implementation: item embedding scaled by ``sqrt(hidden)`` plus a
learned position embedding, embedding dropout, ``layers`` causal self-attention blocks (the query
is layer-normed, keys and values are not; residual; layer norm; point-wise two-layer ReLU
feed-forward with dropout and residual; padding zeroed), a final layer norm, and the item
embedding shared as the output layer. Two deliberate differences, both in the spirit of the
published "full cross-entropy" reruns:

* **Loss.** Softmax cross-entropy over *all* items of the service at every non-padding position,
  instead of binary cross-entropy against one sampled negative.
* **Padding.** Attention never looks at padding keys and the position of an item is its distance
  from the last item of the sequence, so a sequence gives the same outputs however it is padded
  (left, right, or to another width); the reference gets the same effect by always left-padding to
  ``max_len``.

Data: per service, items are indexed ``1..N`` in item-id order (0 is padding), so equal scores
rank by item id as in :mod:`moe_rec.eval.popularity`. A user's training sequence is their
training events in that service (the most recent ``max_len + 1``: inputs ``s[:-1]``, targets
``s[1:]``); a validation / test request has the user's earlier events in that service as history
(the model reads the last ``max_len``), exactly the requests of the popularity baseline.

Training keeps the weights of the epoch with the best validation NDCG@10 (evaluated every
``eval_every`` epochs, stopping after ``patience`` evaluations without improvement); only then is
the requested split scored, once, through :class:`~moe_rec.eval.metrics.RankingMetrics`. Best
weights, config and the validation history go to ``<run_dir>/baselines/sasrec/<service>/``; a
rerun with the same config and data reuses them; an interrupted run, or a rerun with other
``epochs`` / ``patience`` (they only say where the same trajectory stops), resumes from the state
of its last evaluation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.baselines.config import SASRecConfig
from moe_rec.config import ConfigError, to_dict
from moe_rec.console import console, progress
from moe_rec.data import store
from moe_rec.data.cold_start import cold_groups, cold_labels, drop_cold_training
from moe_rec.data.schema import DataError
from moe_rec.eval.metrics import DEFAULT_KS, PAD, RankingMetrics

PAD_ITEM = 0  # padding id of item sequences; items are 1..N
SELECT = "ndcg@10"  # validation metric that picks the best epoch
MODEL_FILE = "model.pt"  # best weights
META_FILE = "config.json"  # config, data fingerprint, validation history, best epoch
STATE_FILE = "train_state.pt"  # training state after the last evaluation (to resume or extend)
# config keys that do not change the training trajectory (epochs / patience only where it stops)
_NOT_FIT = ("device", "num_threads", "services", "eval_batch_size", "epochs", "patience")


@dataclass
class ServiceData:
    """One service's catalogue and sequences, items as indices ``1..N``.

    Attributes:
        service: the service name.
        items: item ids sorted; ``items[i]`` has index ``i + 1``.
        train: per user with at least two training events, their training items in order.
        requests: ``valid`` / ``test`` -> per held-out event ``(history, target)``: the user's
            earlier items in the service, in order, and the held-out item.
    """

    service: str
    items: list[str]
    train: list[list[int]]
    requests: dict[str, list[tuple[list[int], int]]]

    @property
    def num_items(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Hash of what the fit depends on: items, training sequences, validation requests."""
        blob = json.dumps([self.items, self.train, self.requests["valid"]], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_service_data(events: pa.Table, items: pa.Table | None, service: str) -> ServiceData:
    """Index a service's items and build its training sequences and held-out requests.

    Args:
        events: events of all splits (``user``, ``service``, ``item_id``, ``position``, ``split``).
        items: the catalogue (``service``, ``item_id``); every catalogue item of the service is
            ranked, with or without events. ``None``: the items seen in the events.
        service: the service to take.
    """
    rows = events.filter(pc.equal(events.column("service"), service))
    if rows.num_rows == 0:
        raise DataError(f"no events for service {service!r}")
    cols = {c: rows.column(c).to_pylist() for c in ("user", "item_id", "position", "split")}
    universe = set(cols["item_id"])
    if items is not None:
        universe |= set(
            items.filter(pc.equal(items.column("service"), service)).column("item_id").to_pylist()
        )
    item_ids = sorted(universe)
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    per_user: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for user, item, position, split in zip(*cols.values()):
        per_user[user].append((position, index[item], split))
    train: list[list[int]] = []
    requests: dict[str, list[tuple[list[int], int]]] = {"valid": [], "test": []}
    for user in sorted(per_user):
        history = sorted(per_user[user])
        seq = [item for _, item, _ in history]
        train_items = [item for _, item, split in history if split == "train"]
        if len(train_items) >= 2:
            train.append(train_items)
        for j, (_, item, split) in enumerate(history):
            if split in requests:
                requests[split].append((seq[:j], item))
    return ServiceData(service, item_ids, train, requests)


def pad_left(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(B, L)`` item indices, each sequence right-aligned, ``L`` the longest, padded with 0."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), PAD_ITEM, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            out[b, width - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def training_batch(seqs: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets, both ``(B, L)`` left-padded, from the last ``max_len + 1`` items."""
    tails = [s[-(max_len + 1) :] for s in seqs]
    return pad_left([t[:-1] for t in tails]), pad_left([t[1:] for t in tails])


class _Attention(nn.Module):
    """Multi-head attention with projections and attention dropout (``nn.MultiheadAttention``'s math)."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``query``, ``keys`` ``(B, L, D)``; ``mask`` ``(B, 1, L, L)`` True where query i may see key j."""
        b, length, d = query.shape
        q = self.q(query).view(b, length, self.heads, d // self.heads).transpose(1, 2)  # (B, H, L, D/H)
        k, v = self.kv(keys).view(b, length, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, D/H)
        return self.out(out.transpose(1, 2).reshape(b, length, d))


class _Block(nn.Module):
    """One SASRec block as in the reference: LN(query) attends over the raw sequence, residual, LN,
    point-wise feed-forward with residual, padding zeroed."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = _Attention(hidden, heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, D)``, ``mask`` ``(B, 1, L, L)``, ``real`` ``(B, L)`` -> ``(B, L, D)``."""
        q = self.attn_norm(x)
        x = self.ffn_norm(q + self.attn(q, x, mask))
        return (x + self.ffn(x)) * real.unsqueeze(-1)


class SASRec(nn.Module):
    """Self-attentive sequential recommender over one service's ``num_items`` items (ids 1..N)."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.max_len, self.hidden = cfg.max_len, cfg.hidden
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=PAD_ITEM)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.last_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        for param in self.parameters():  # the reference's Xavier-normal init of every matrix
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_emb.weight[PAD_ITEM].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` ``(B, L)`` item indices, 0 = padding, ``L <= max_len`` -> hidden states ``(B, L, D)``.

        Position ids count back from the sequence's last item and attention skips padding keys,
        so neither the padding side nor its width changes an item's output.
        """
        if seq.shape[1] > self.max_len:
            raise ValueError(f"sequence length {seq.shape[1]} > max_len {self.max_len}")
        real = seq != PAD_ITEM  # (B, L)
        after = real.flip(1).long().cumsum(1).flip(1)  # (B, L): real items at or after each column
        x = self.item_emb(seq) * math.sqrt(self.hidden) + self.pos_emb((after - 1).clamp(min=0))
        x = self.emb_dropout(x) * real.unsqueeze(-1)
        length = seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)  # padding rows see themselves: no NaN
        mask = ((causal & real.unsqueeze(1)) | eye).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask, real)
        return self.last_norm(x)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` hidden states -> ``(..., N)`` scores of items 1..N (the shared embedding)."""
        return hidden @ self.item_emb.weight[1:].T

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy over all N items at every position whose target is not padding.

        Args:
            inputs: ``(B, L)`` item indices.
            targets: ``(B, L)`` the next item at each position, 0 where there is none.
        """
        keep = targets != PAD_ITEM  # (B, L)
        logits = self.scores(self(inputs)[keep])  # (P, N): only real positions pay for the N columns
        return F.cross_entropy(logits, targets[keep] - 1)


def rank_items(scores: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The ``k`` best items per request, ties by lower index (= item id), excluded items skipped.

    Args:
        scores: ``(B, N)`` scores of items 1..N.
        k: items per request.
        exclude: per request, item indices (1..N) not to rank (e.g. its history).

    Returns:
        ``(B, k)`` item indices, best first, ``PAD`` (-1) where fewer than ``k`` items are left.
    """
    scores = scores.float().clone()
    if exclude is not None:
        rows = [b for b, items in enumerate(exclude) for _ in items]
        cols = [i - 1 for items in exclude for i in items]
        scores[rows, cols] = -math.inf
    k = min(k, scores.shape[1])
    values, top = torch.topk(scores, k, dim=1)  # (B, k); the order of equal scores is unspecified
    top, _ = top.sort(dim=1)  # by index, then stably by score: equal scores rank by index
    values = scores.gather(1, top)
    values, order = values.sort(dim=1, descending=True, stable=True)
    top = top.gather(1, order)
    # a tie across the k-th place may have let topk drop a lower index: sort those rows in full
    boundary = (scores >= values[:, -1:]).sum(dim=1) > k
    if boundary.any():
        full_values, full = torch.sort(scores[boundary], dim=1, descending=True, stable=True)
        values[boundary], top[boundary] = full_values[:, :k], full[:, :k]
    return (top + 1).masked_fill(values == -math.inf, PAD)


@torch.no_grad()
def evaluate_split(
    model: SASRec,
    data: ServiceData,
    split: str,
    metrics: RankingMetrics,
    exclude_seen: bool = False,
    batch_size: int = 512,
    cold: set[tuple[str, str]] | None = None,
) -> None:
    """Score every ``split`` request of ``data`` over all service items and add it to ``metrics``
    (with ``cold``, the items kept out of training, also as a cold or warm target)."""
    model.eval()
    device = next(model.parameters()).device
    requests = data.requests[split]
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        inputs = pad_left([history[-model.max_len :] for history, _ in batch]).to(device)
        scores = model.scores(model(inputs)[:, -1])  # (B, N): the last column is the last item
        exclude = [history for history, _ in batch] if exclude_seen else None
        ranked = rank_items(scores, max(metrics.ks), exclude).cpu()
        target = torch.tensor([t for _, t in batch], dtype=torch.long)
        services = [data.service] * len(batch)
        labels = cold_labels(services, [data.items[t - 1] for _, t in batch], cold)
        metrics.update(ranked, target, services, labels)


def _validate(
    model: SASRec, data: ServiceData, exclude_seen: bool, ks: Sequence[int], batch_size: int
) -> dict[str, float]:
    metrics = RankingMetrics([data.service], ks=ks, prefix="valid")
    evaluate_split(model, data, "valid", metrics, exclude_seen, batch_size)
    return metrics.compute()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fit_service(
    data: ServiceData,
    cfg: SASRecConfig,
    out_dir: Path,
    exclude_seen: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[SASRec, dict[str, Any]]:
    """Train SASRec on one service and return it with its best-epoch weights, plus the run record.

    Only the validation requests are scored here. A finished run in ``out_dir`` with the same
    config and data is loaded instead of retrained; otherwise a saved state with the same
    trajectory (config without ``epochs`` / ``patience``, data) resumes from its last evaluation,
    with the same shuffles and dropout masks as an uninterrupted run.

    Returns:
        The model (eval mode) and the record written to ``out_dir/config.json``: ``config``,
        ``data``, ``best_epoch``, ``best_valid``, ``epochs_run``, ``seconds_per_epoch``, ``history``.
    """
    if not data.requests["valid"]:
        raise DataError(f"service {data.service!r} has no validation requests to select an epoch on")
    ks = sorted({*ks, int(SELECT.split("@")[1])})  # validation needs the selection metric's K
    device = resolve_device(cfg.device)
    out_dir = Path(out_dir)
    key = {
        "config": {k: v for k, v in to_dict(cfg).items() if k not in _NOT_FIT},
        "exclude_seen": exclude_seen,
        "data": data.fingerprint(),
        "num_items": data.num_items,
    }
    meta_path, model_path, state_path = out_dir / META_FILE, out_dir / MODEL_FILE, out_dir / STATE_FILE
    if meta_path.exists() and model_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and meta.get("stop") == [cfg.epochs, cfg.patience]:
            model = SASRec(data.num_items, cfg)
            model.load_state_dict(torch.load(model_path, map_location="cpu"))
            console.print(f"sasrec {data.service}: reusing {model_path} (best epoch {meta['best_epoch']})")
            return model.to(device).eval(), meta
    # From here on this directory holds another run: the record of a finished one must not stay
    # beside weights it does not describe (an interrupted fit would otherwise be "reused" later).
    meta_path.unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    model = SASRec(data.num_items, cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    shuffle = torch.Generator().manual_seed(cfg.seed)
    run: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "history": [], "seconds": 0.0}
    best_state = copy.deepcopy(model.state_dict())
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            shuffle.set_state(state["shuffle"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            best_state, run = state["best_state"], state["run"]
            console.print(f"sasrec {data.service}: resuming after epoch {run['epoch']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress() as bar:
        task = bar.add_task(f"sasrec {data.service}", total=cfg.epochs, completed=run["epoch"])
        for epoch in range(run["epoch"] + 1, cfg.epochs + 1):
            if run["bad"] >= cfg.patience:
                break
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(data.train), generator=shuffle).tolist()
            total, count = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                inputs, targets = training_batch(
                    [data.train[i] for i in order[start : start + cfg.batch_size]], cfg.max_len
                )
                loss = model.loss(inputs.to(device), targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(inputs), count + len(inputs)
            run["epoch"] = epoch
            run["seconds"] += time.perf_counter() - t0
            bar.advance(task)
            if epoch % cfg.eval_every and epoch != cfg.epochs:
                continue
            valid = _validate(model, data, exclude_seen, ks, cfg.eval_batch_size)
            score = valid[f"valid/{data.service}/{SELECT}"]
            run["history"].append({"epoch": epoch, "loss": total / max(count, 1), **valid})
            if score > run["best"]:
                run.update(best=score, best_epoch=epoch, bad=0)
                best_state = copy.deepcopy(model.state_dict())
            else:
                run["bad"] += 1
            console.print(
                f"sasrec {data.service} epoch {epoch}: loss {total / max(count, 1):.4f}, valid N@10 {score:.4f}"
                f" (best {run['best']:.4f} @ {run['best_epoch']}), {run['seconds'] / epoch:.0f} s/epoch"
            )
            state = {
                "key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "shuffle": shuffle.get_state(), "rng": torch.get_rng_state(), "best_state": best_state, "run": run,
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }  # fmt: skip
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
    best = next(h for h in run["history"] if h["epoch"] == run["best_epoch"])
    meta = {
        "key": key,
        "stop": [cfg.epochs, cfg.patience],
        "best_epoch": run["best_epoch"],
        "best_valid": {k: v for k, v in best.items() if k != "epoch"},
        "epochs_run": run["epoch"],
        "seconds_per_epoch": run["seconds"] / max(run["epoch"], 1),
        "history": run["history"],
    }
    torch.save(best_state, model_path.with_suffix(".tmp"))
    model_path.with_suffix(".tmp").replace(model_path)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # last: it marks the run finished
    model.load_state_dict(best_state)
    return model.eval(), meta


def evaluate_sasrec(
    data_dir: Path,
    out_dir: Path,
    cfg: SASRecConfig,
    split: str = "test",
    exclude_seen: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    cold: set[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Fit (or reuse) one SASRec per service on a prepared data directory, select each on the
    validation split, then score ``split`` once. With ``cold`` (the cold-start benchmark's items)
    their training events are left out (of training and of histories: SASRec has no vector for
    them), and cold and warm targets are reported beside the services.

    Args:
        data_dir: a prepared data directory (events of all splits, catalogue).
        out_dir: where each service's model goes (``out_dir/<service>/``).
        cfg: the ``sasrec`` config section.
        split: ``valid`` or ``test``.
        exclude_seen: do not rank items of the request's history (in selection and in the score).
        ks: cut-offs K.

    Returns:
        :meth:`RankingMetrics.compute` results with the prefix ``split``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    events = store.load_table(Path(data_dir))
    items = store.load_table(Path(data_dir), store.ITEMS_DIR)
    present = sorted(set(events.column("service").to_pylist()))
    events = drop_cold_training(events, cold)
    services = cfg.services or present
    unknown = sorted(set(services) - set(present))
    if unknown:
        raise ConfigError(f"sasrec.services: {unknown} not in the data; it has {present}")
    metrics = RankingMetrics(services, ks=ks, prefix=split, groups=cold_groups(cold))
    for service in services:
        data = build_service_data(events, items, service)
        model, meta = fit_service(data, cfg, Path(out_dir) / service, exclude_seen, ks)
        console.print(
            f"sasrec {service}: best epoch {meta['best_epoch']} of {meta['epochs_run']}, "
            f"valid N@10 {meta['best_valid'][f'valid/{service}/{SELECT}']:.4f}, "
            f"{meta['seconds_per_epoch']:.1f} s/epoch"
        )
        evaluate_split(model, data, split, metrics, exclude_seen, cfg.eval_batch_size, cold)
    return metrics.compute()
