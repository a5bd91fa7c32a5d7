"""Do the services of a joint model pull its shared weights the same way? Per-service gradients
at a checkpoint, and their cosine similarity per part of the model.

The joint item-level model trails one model per service (docs/RESULTS.md). One suspect is
conflict: each service's gradient on the shared weights pointing against another's, so that a
joint step serves none of them fully (what gradient surgery, e.g. PCGrad, projects away). This
loads a run's checkpoint (``best`` by default) into the run's trainer, takes ``--batches`` training
micro batches, and for each service computes the gradient of the loss over that service's
positions alone (the labels of the others' events ignored; no dropout), summed over the batches.
It prints each service's loss on those batches (how well the weights fit that service's training
data: a one-service run's checkpoint gives the same number for one model per service), then, per
part (routers, attention, experts, embeddings, code heads, item term; the rest), each service's
gradient norm and the cosine of every pair of services: near 1, the services agree; near 0, they
pull apart; below 0, against each other. The control beside them: each service's cosine with
itself, its gradient on the even batches against the odd ones (what sampling alone leaves of one
service's own agreement).

    OMP_NUM_THREADS=1 python tools/service_gradients.py --config configs/experiments/amazon2014_joint.yaml \\
        run_dir=runs/joint-item --batches 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections.abc import Iterable
from typing import NamedTuple

import torch

from moe_rec.config import load_config
from moe_rec.data.sequences import IGNORE_INDEX
from moe_rec.experiment import ExperimentConfig
from moe_rec.train import checkpoint as ckpt
from moe_rec.train.trainer import Trainer

PARTS = (  # (name, pattern on the parameter name): the first match names a parameter's part
    ("routers", r"\.router\."),
    ("attention", r"\.self_attn\."),
    ("experts (FFN)", r"\.mlp\."),
    ("embeddings (codes, services)", r"^model\.embed_tokens\."),
    ("code heads", r"^(code_proj|service_proj|service_code_embed)"),
    ("item term and text", r"^(item_embed|text_proj|service_text_proj|text_prior)"),
)  # the rest (the norms): "other"


def part_of(name: str) -> str:
    return next((part for part, pattern in PARTS if re.search(pattern, name)), "other")


def only_service(batch: dict[str, torch.Tensor], service_token: int) -> dict[str, torch.Tensor]:
    """``batch`` with the labels of every event not of ``service_token`` ignored: the loss (a mean
    over scored positions) is then that service's loss alone."""
    labels = batch["labels"].clone()  # (B, T, P)
    labels[batch["item_tokens"][..., 0] != service_token] = IGNORE_INDEX
    return {**batch, "labels": labels}


class ServiceGradients(NamedTuple):
    """:func:`service_gradients`: per service, the gradients and the loss over its positions."""

    grads: dict[str, dict[str, torch.Tensor]]  # {service: {parameter name: gradient summed over batches}}
    loss_sums: dict[str, float]  # {service: the loss summed over its scored positions}
    positions: dict[str, int]  # {service: its scored positions}


def service_gradients(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], services: dict[str, int]
) -> ServiceGradients:
    """Per service, the gradient of the loss over that service's positions alone, summed over
    ``batches`` (a batch without any of them adds nothing), and that loss summed over its
    positions; ``services``: name -> token id."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = ServiceGradients(
        {s: {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()} for s in services},
        dict.fromkeys(services, 0.0),
        dict.fromkeys(services, 0),
    )
    for batch in batches:
        for name, token in services.items():
            one = only_service(batch, token)
            scored = int((one["labels"][:, 1:, 0] != IGNORE_INDEX).sum())
            if not scored:
                continue
            loss = model(**one).lm_loss  # the mean over this service's scored positions
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    out.grads[name][n] += g.double()
            out.loss_sums[name] += float(loss.detach()) * scored
            out.positions[name] += scored
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na and nb else float("nan")


def part_cosines(
    even: dict[str, dict[str, torch.Tensor]], odd: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict]:
    """{part: {"norm": {service: |g|}, "cosine": {"a/b": cos(g_a, g_b)}, "self": {service:
    cos(g_even, g_odd)}}} over each part's parameters flattened together (float64); ``even`` and
    ``odd``: :func:`service_gradients` of two halves of the batches, g their sum."""
    services = list(even)
    names = list(even[services[0]])
    out: dict[str, dict] = {}
    for part in dict.fromkeys(part_of(n) for n in names):
        half = [{s: torch.cat([g[s][n].flatten() for n in names if part_of(n) == part]) for s in services}
                for g in (even, odd)]  # fmt: skip
        flat = {s: half[0][s] + half[1][s] for s in services}
        out[part] = {
            "norm": {s: float(v.norm()) for s, v in flat.items()},
            "cosine": {f"{a}/{b}": cosine(flat[a], flat[b]) for a, b in itertools.combinations(services, 2)},
            "self": {s: cosine(half[0][s], half[1][s]) for s in services},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="the run's experiment YAML; run_dir=... among the overrides"
    )
    parser.add_argument("--checkpoint", default="best", help="a tag (step_00000665) or best / latest")
    parser.add_argument("--batches", type=int, default=8, help="training micro batches to sum over")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error(f"--batches must be at least 2 (the even and the odd half), not {args.batches}")
    cfg = load_config(ExperimentConfig, args.config, ["train.wandb.mode=disabled", *args.overrides])
    trainer = Trainer(cfg)
    tag = args.checkpoint
    if tag in ("best", "latest"):
        pointer = cfg.checkpoint_dir / tag
        if not pointer.exists():
            raise SystemExit(f"{pointer} not found: train the run first, or name a checkpoint tag")
        tag = pointer.read_text().strip()
    if not (cfg.checkpoint_dir / tag).is_dir():
        found = sorted(d.name for d in cfg.checkpoint_dir.glob("step_*"))
        raise SystemExit(f"error: {cfg.checkpoint_dir / tag} not found (checkpoints there: {found})")
    try:
        ckpt.verify(cfg.checkpoint_dir, tag, trainer.world_size)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    trainer.engine.load_checkpoint(str(cfg.checkpoint_dir), tag=tag, load_optimizer_states=False,
                                   load_lr_scheduler_states=False)  # fmt: skip
    model = trainer.engine.module.eval()  # no dropout: the gradients of the weights as they are
    stream = trainer.data(trainer.position)
    batches = [mb for _, micro in itertools.islice(stream, args.batches) for mb in micro][: args.batches]
    services = {s: trainer.vocab.service_token(s) for s in trainer.sids.services}
    even, odd = (
        service_gradients(model, batches[0::2], services),
        service_gradients(model, batches[1::2], services),
    )
    report = part_cosines(even.grads, odd.grads)
    positions = {s: even.positions[s] + odd.positions[s] for s in services}
    loss = {
        s: (even.loss_sums[s] + odd.loss_sums[s]) / positions[s] if positions[s] else None for s in services
    }
    if args.json:
        print(json.dumps({"checkpoint": tag, "batches": len(batches), "loss": loss, "positions": positions,
                          "parts": report}))  # fmt: skip
        return
    print(f"{cfg.run_dir} {tag}: per-service gradients over {len(batches)} training micro batches")
    print("training loss (no dropout): " + "  ".join(
        f"{s} {v:.4f} ({positions[s]:,} positions)" if v is not None else f"{s} - (no positions)"
        for s, v in loss.items()))  # fmt: skip
    for part, r in report.items():
        norms = "  ".join(f"|g_{s}| {v:.3g}" for s, v in r["norm"].items())
        cos = "  ".join(f"cos {pair} {v:+.3f}" for pair, v in r["cosine"].items())
        own = "  ".join(f"{s} even/odd {v:+.3f}" for s, v in r["self"].items())
        print(f"{part:<30} {norms}\n{'':<30} {cos}\n{'':<30} {own}")


if __name__ == "__main__":
    main()
