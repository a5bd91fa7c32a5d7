"""What training reports: validation (teacher-forced next-item accuracy, and Recall / NDCG by
constrained beam search, per service), throughput and MFU, and the rank-0 logger that writes
``metrics.jsonl`` and W&B.

Teacher-forced validation asks the model for the held-out item's ``L+1`` codes given the context
(which ends with the item's service token), feeding the true codes. ``exact_match`` is the share
of items whose every code is the arg-max; ``token_acc`` the share of codes. Retrieval validation
ranks the service's items for the same requests exactly as the test evaluation does
(:func:`moe_rec.eval.evaluate.rank_requests`): ``recall@K`` and ``ndcg@K``, the numbers a checkpoint
is chosen by. Counts are summed over ranks before dividing, so the numbers do not depend on the
world size.

Every line of ``metrics.jsonl`` says what it is in ``kind``: ``train`` (losses, throughput),
``valid`` (validation), ``router`` (expert load), or the split a ``moe-rec eval`` of one of the
run's checkpoints measured (``test``, ``valid``; with ``checkpoint``, the tag). Those last go to
the W&B run's summary too, in the same W&B run (the id kept in ``<run_dir>/wandb_id``).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.data.vocab import Vocabulary
from moe_rec.eval.config import EvalConfig
from moe_rec.eval.evaluate import by_length, rank_requests
from moe_rec.eval.metrics import DEFAULT_KS, MACRO, RankingMetrics, all_reduce_
from moe_rec.model import MoERecConfig
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import SIDTrie
from moe_rec.train.data import Collator

if TYPE_CHECKING:  # matplotlib loads only when a heat map is drawn
    from matplotlib.figure import Figure

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # bf16 dense


def eval_rows(valid: Sequence[dict[str, Any]], vocab: Vocabulary) -> list[dict[str, Any]]:
    """Valid samples as teacher-forced rows: the target's codes appended, labelled, rest -100."""
    rows = []
    for r in valid:
        target = vocab.item_tokens(r["service"], r["target"])[1:]  # (L+1,) codes after the service token
        service = vocab.service_index(r["service"])
        rows.append(
            {
                "user": r["user"],
                "service": service,
                "input_ids": list(r["input_ids"]) + target,
                "domain_ids": list(r["domain_ids"]) + [service] * len(target),
                "labels": [IGNORE_INDEX] * len(r["input_ids"]) + target,
            }
        )
    return rows


@torch.no_grad()
def evaluate(
    engine: Any, rows: Sequence[dict[str, Any]], vocab: Vocabulary, collator: Collator, batch_size: int
) -> dict[str, float]:
    """Teacher-forced accuracy per service, reduced over ranks. Every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters collectively); a rank out of rows repeats row 0 with
    weight 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(rows[rank::world])
    num_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    counts = torch.zeros(len(vocab.services), 4, dtype=torch.float64)  # n, exact, code hits, codes
    engine.eval()
    for i in range(num_batches):
        chunk = mine[i * batch_size : (i + 1) * batch_size]
        weight = 1.0 if chunk else 0.0
        chunk = chunk or [rows[0]]
        batch = {k: v.to(engine.device) for k, v in collator(chunk).items()}
        labels = batch.pop("labels")[:, 1:]  # (B, T-1) aligned with logits[:, :-1]
        logits = engine(**batch).logits[:, :-1]  # (B, T-1, V)
        scored = labels != IGNORE_INDEX
        hits = (logits.argmax(-1) == labels) & scored
        for j, row in enumerate(chunk):
            n_hit, n_codes = hits[j].sum().item(), scored[j].sum().item()
            counts[row["service"]] += weight * torch.tensor([1.0, float(n_hit == n_codes), n_hit, n_codes])
    engine.train()
    all_reduce_(counts)
    out: dict[str, float] = {}
    for name, c in [("", counts.sum(0)), *((f"{s}/", counts[i]) for i, s in enumerate(vocab.services))]:
        if c[0] > 0:
            out[f"valid/{name}exact_match"] = (c[1] / c[0]).item()
            out[f"valid/{name}token_acc"] = (c[2] / c[3]).item()
    return out


def retrieval(
    engine: Any, samples: Sequence[dict[str, Any]], table: SIDTable, trie: SIDTrie, cfg: EvalConfig
) -> dict[str, float]:
    """``valid/recall@K`` and ``valid/ndcg@K``, overall and per service, of constrained beam search
    over ``samples`` (valid rows), rank-sharded and reduced. Every rank runs the same number of
    searches (ZeRO-3 gathers parameters collectively); a rank out of rows searches row 0 unscored."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = by_length(samples[rank::world])
    num_batches = math.ceil(math.ceil(len(samples) / world) / cfg.batch_size)
    metrics = RankingMetrics(list(table.vocabulary().services), prefix="valid")
    engine.eval()
    for i in range(num_batches):
        chunk = mine[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        ranked, target = rank_requests(engine.module, table, trie, chunk or [samples[0]], cfg)
        if chunk:
            metrics.update(ranked, target, [r["service"] for r in chunk])
    engine.train()
    metrics.reduce()
    return {
        k: v
        for k, v in metrics.compute().items()
        if not k.endswith("/count") and f"/{MACRO}/" not in k  # the micro mean and each service
    }


def validation_keys(services: Sequence[str], critiques: bool = False) -> list[str]:
    """Every metric :func:`evaluate` and :func:`retrieval` can report (``train.best_metric`` is one);
    with ``critiques`` (``train.critique_valid``) also ``valid/critique/<metric>`` (the critique
    requests of the valid split) and ``valid/mixed/<metric>`` (the mean of the plain and the critique
    value), recall@K / ndcg@K."""
    names = ["exact_match", "token_acc", *(f"{m}@{k}" for m in ("recall", "ndcg") for k in DEFAULT_KS)]
    keys = [f"valid/{scope}{name}" for scope in ["", *(f"{s}/" for s in services)] for name in names]
    if critiques:
        keys += [
            f"valid/{scope}/{m}@{k}"
            for scope in CRITIQUE_SCOPES
            for m in ("recall", "ndcg")
            for k in DEFAULT_KS
        ]
    return keys


CRITIQUE_SCOPES = (
    "critique",
    "mixed",
)  # train.critique_valid: the critique requests, and their mean with the plain


def mixed_metrics(plain: dict[str, float], critique: dict[str, float]) -> dict[str, float]:
    """``valid/mixed/<m>``: the mean of ``valid/<m>`` (``plain``) and ``valid/critique/<m>``
    (``critique``) for every overall recall@K / ndcg@K both hold."""
    out = {}
    for key, value in critique.items():
        name = key.removeprefix("valid/critique/")
        if "/" not in name and f"valid/{name}" in plain:
            out[f"valid/mixed/{name}"] = (plain[f"valid/{name}"] + value) / 2
    return out


def flops_per_token(config: MoERecConfig, active_params: int, seq_len: float) -> float:
    """Training FLOPs per token: 6 x active parameters (fwd + bwd matmuls) plus attention scores and
    values, 12 x layers x heads x head_dim x sequence length (as in nanoGPT's ``estimate_mfu``)."""
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * active_params + attn


def peak_flops(configured_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the configured value, else looked up by GPU name; ``None`` on CPU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def expert_load_figure(share: torch.Tensor, services: Sequence[str], step: int) -> Figure:
    """Expert load as heat maps, one panel per MoE layer: services as rows, experts as columns, the
    colour the share of the service's routed tokens that went to the expert (each row sums to 1),
    one colour scale for every panel.

    Args:
        share: (L, S, E) share of each service's routed tokens per expert.
        services: the S service names, in the order of ``share``'s rows.
        step: the optimizer step the load was summed up to (for the title).

    Returns:
        A matplotlib figure (no pyplot state: render it with ``FigureCanvasAgg``).
    """
    from matplotlib.figure import Figure

    layers, n_services, n_experts = share.shape
    panel = (min(10.0, max(2.5, 0.35 * n_experts + 1.5)), max(1.8, 0.35 * n_services + 1.2))  # inches
    cols = max(1, min(layers, int(16 // panel[0])))  # rows of panels at most 16 inches wide
    rows = math.ceil(layers / cols)
    fig = Figure(figsize=(cols * panel[0] + 1.2, rows * panel[1] + 0.6), layout="constrained")
    fig.suptitle(f"Expert load at step {step:,}: share of each service's routed tokens")
    vmax = max(float(share.max()), 1e-12)
    axes = []
    for layer in range(layers):
        ax = fig.add_subplot(rows, cols, layer + 1)
        image = ax.imshow(share[layer].float().numpy(), cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("service")
        ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)], fontsize="small")
        ax.set_yticks(range(n_services), list(services), fontsize="small")
        axes.append(ax)
    fig.colorbar(image, ax=axes, label="share of the service's tokens")
    return fig


def figure_pixels(fig: Figure) -> np.ndarray:
    """``fig`` rendered to an (H, W, 4) uint8 RGBA array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


class RankZeroLogger:
    """Rank 0 writes one JSON line per log event to ``metrics.jsonl``, each with its ``kind``, and
    mirrors it to W&B; other ranks do nothing. The W&B run id is kept in ``<run_dir>/wandb_id`` so
    a resumed run, and ``moe-rec eval`` of its checkpoints, continue the same W&B run (offline,
    W&B cannot resume in place: each process writes one more part of the run under
    ``<run_dir>/wandb``, and :meth:`location` says how to upload them all).

    Args:
        mode: W&B's ``online``, ``offline`` or ``disabled`` (no W&B run, no id kept, and wandb not
            imported: it need not be installed).
        new_run: start a W&B run when ``run_dir`` has none yet; False: only continue one (W&B stays
            off without it).
    """

    def __init__(
        self,
        *,
        rank: int,
        run_dir: Path,
        metrics_path: Path,
        project: str,
        mode: str,
        name: str,
        config: dict | None = None,
        new_run: bool = True,
    ) -> None:
        self.active = rank == 0
        self.metrics_path = metrics_path
        self.wandb_dir = run_dir / "wandb"
        self.run = None
        if not self.active:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        if mode == "disabled" or not (new_run or id_file.exists()):
            return
        import wandb

        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            mode=mode,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(quiet=True),  # no history sparklines on exit; location() says where
        )

    def _write(self, line: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def log(self, metrics: dict[str, Any], step: int, *, kind: str) -> None:
        """``metrics`` at ``step`` as one ``metrics.jsonl`` line of ``kind`` (train, valid) and W&B history."""
        if not self.active:
            return
        self._write({"step": step, "kind": kind, **metrics})
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_result(self, metrics: dict[str, Any], step: int, *, kind: str, **fields: Any) -> None:
        """A final number (``moe-rec eval`` of the checkpoint of ``step``): one ``metrics.jsonl`` line of
        ``kind`` with ``fields`` (e.g. ``checkpoint``), and the W&B run's summary, where results go
        (W&B history refuses a step below the run's last, and a checkpoint's step usually is)."""
        if not self.active:
            return
        self._write({"step": step, "kind": kind, **fields, **metrics})
        if self.run is not None:
            self.run.summary.update(metrics)

    def summarize(self, values: dict[str, Any]) -> None:
        """``values`` into the W&B run's summary only (final numbers, e.g. a private run's epsilon,
        whose history rows ``metrics.jsonl`` already has)."""
        if self.active and self.run is not None:
            self.run.summary.update(values)

    def log_expert_load(self, load: torch.Tensor, services: Sequence[str], step: int) -> None:
        """Expert load per service as a W&B table (layer, service, expert, share of the service's
        routed tokens) and heat maps (:func:`expert_load_figure`), and as nested lists (layer,
        service, expert) in a ``metrics.jsonl`` line of kind ``router``; ``load`` is
        (L, num_domains, E) token counts."""
        if not self.active or load.numel() == 0:  # the dense twin has no experts to show
            return
        counts = load[:, : len(services)]  # (L, S, E)
        share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        self._write(
            {"step": step, "kind": "router", "services": list(services), "router/expert_load": share.tolist()}
        )
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=["layer", "service", "expert", "share"])
        for layer in range(share.shape[0]):
            for d, service in enumerate(services):
                for e in range(share.shape[2]):
                    table.add_data(layer, service, e, share[layer, d, e].item())
        image = wandb.Image(figure_pixels(expert_load_figure(share, services, step)))
        self.run.log({"router/expert_load": table, "router/expert_load_heatmap": image}, step=step)

    def location(self) -> str:
        """Where the W&B run is: its URL, or for an offline run its parts and the command that
        uploads them all (``wandb sync`` takes the parts of one run in order)."""
        if self.run is None or self.run.disabled:
            return "W&B disabled"
        if not self.run.offline:
            return self.run.url or f"W&B run {self.run.id}"
        pattern = f"offline-run-*-{self.run.id}"
        n = len(list(self.wandb_dir.glob(pattern)))
        return (
            f"offline run {self.run.id} in {self.wandb_dir} ({n} part{'s' * (n != 1)}: one per process that "
            f"logged to it); upload all of it with `wandb sync {self.wandb_dir / pattern}`"
        )

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
