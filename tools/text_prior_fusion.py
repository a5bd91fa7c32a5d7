"""Add a text prior to a trained item model after training: how much would it help?

For a checkpoint of an item-level model with ``item_text`` (its catalogue's text embeddings are in
its weights), every request's exact scores of the asked service's items (as ``moe-rec eval``
ranks them) get ``beta x cos(text of the last history item of that service, text of the item)``,
the last item itself left out. ``beta`` is chosen on the validation split and the test split is
read at that ``beta`` (the other betas' test numbers printed beside it, not used). This is how the
learned ``item_text_prior`` (docs/model.md) was found; it is a measurement, not a serving path.

    OMP_NUM_THREADS=1 python tools/text_prior_fusion.py runs/beauty-text --checkpoint best \\
        --betas 0 64 96 128 192              # add --keep-last for the ablation
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_rec.data.positions import item_batch
from moe_rec.eval.exact import history_rows, item_scores, request_log_probs
from moe_rec.sid.table import SIDTable
from moe_rec.train.checkpoint import load_model
from moe_rec.train.data import load_split


@torch.no_grad()
def ndcg10(
    run: Path, tag: str, split: str, betas: list[float], batch_size: int, keep_last: bool = False
) -> dict[float, float]:
    """NDCG@10 of ``split`` for each ``beta`` (full ranking of the asked service's items); with
    ``keep_last`` the last item keeps its prior (cosine 1 with itself)."""
    model = load_model(run / "checkpoints", tag).eval()
    if getattr(model, "item_text", None) is None:
        raise SystemExit(f"{run}: the model has no item_text embeddings to compare")
    table = SIDTable.load(run / "sids")
    requests = load_split(run / "sequences", split).to_list()
    text = F.normalize(model.item_text.float(), dim=-1)  # (N, D_text)
    vectors = model.item_table()  # (N, D') or None
    sums = dict.fromkeys(betas, 0.0)
    for start in range(0, len(requests), batch_size):
        rows = requests[start : start + batch_size]
        batch = item_batch(rows, table.vocabulary(), model.config.num_user_buckets, left_pad=True)
        log_probs, query, _ = request_log_probs(model, batch)
        base = item_scores(log_probs, table.codes)  # (B, N)
        if vectors is not None:
            base += table.codes.shape[1] * (query @ vectors.T)
        other = (
            table.service_index[None, :]
            != torch.tensor([table.services.index(r["service"]) for r in rows])[:, None]
        )  # (B, N): items of another service are never ranked
        base = base.masked_fill(other, -torch.inf)
        seen = [history_rows(batch["item_tokens"][i], r["service"], table) for i, r in enumerate(rows)]
        last = torch.tensor([h[-1] if h else -1 for h in seen])  # (B,)
        cos = (text[last.clamp_min(0)] @ text.T) * (last >= 0)[:, None]  # (B, N); 0 with no history
        if not keep_last:
            cos[torch.arange(len(rows)), last.clamp_min(0)] = 0.0  # the last item gets no prior
        target = torch.from_numpy(table.rows([r["service"] for r in rows], [r["target_item"] for r in rows]))
        for beta in betas:
            scores = base + beta * cos
            rank = (scores > scores.gather(1, target[:, None].long())).sum(1) + 1  # (B,)
            sums[beta] += float(torch.where(rank <= 10, 1 / torch.log2(rank.double() + 1), 0.0).sum())
    return {beta: total / len(requests) for beta, total in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run of the item model with item_text")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step_* tag")
    parser.add_argument("--betas", type=float, nargs="+", default=[0, 64, 96, 128, 192])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--keep-last", action="store_true", help="the last item keeps its prior (an ablation)"
    )
    args = parser.parse_args()
    run = (args.run_dir, args.checkpoint)
    valid = ndcg10(*run, "valid", args.betas, args.batch_size, args.keep_last)
    chosen = max(valid, key=valid.get)
    test = ndcg10(*run, "test", args.betas, args.batch_size, args.keep_last)
    print(f"{'beta':>8}{'valid N@10':>12}{'test N@10':>12}")
    for beta in args.betas:
        print(
            f"{beta:>8g}{valid[beta]:>12.4f}{test[beta]:>12.4f}{'  <- chosen on valid' if beta == chosen else ''}"
        )


if __name__ == "__main__":
    main()
