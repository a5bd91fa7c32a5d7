"""The pieces of the trainer that need no process group: model sizing from the vocabulary, the LR
schedule, the DeepSpeed config written from ours, the FLOP count against a counted step, validation
and checkpoint cadence in steps or epochs, and what start-up refuses; and one tiny run whose cadence
is given in epochs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_rec.config import ConfigError
from moe_rec.data.schema import DataError
from moe_rec.model import MoERecForCausalLM, parameter_report
from moe_rec.train.config import every_steps
from moe_rec.train.metrics import flops_per_token
from moe_rec.train.trainer import Trainer, deepspeed_config, lr_lambda, model_config
from tests.train.conftest import VOCAB, tiny_config


def test_model_is_sized_from_the_vocabulary(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "model.overrides={num_experts: 6}")
    mc = model_config(cfg.model, VOCAB)
    assert (mc.vocab_size, mc.num_domains, mc.num_experts) == (VOCAB.size, VOCAB.service_slots, 6)
    dense = model_config(tiny_config(tmp_path, "model.dense=true").model, VOCAB)
    assert set(dense.ffn_types) == {"dense"}
    moe = parameter_report(MoERecForCausalLM(model_config(tiny_config(tmp_path).model, VOCAB)))
    twin = parameter_report(MoERecForCausalLM(dense))
    assert moe["total"] > twin["total"]
    assert abs(moe["active_per_token"] - twin["active_per_token"]) / twin["active_per_token"] < 0.1  # routers


def test_lr_warms_up_linearly_then_follows_a_cosine_to_min_lr(tmp_path: Path) -> None:
    tc = tiny_config(tmp_path, "train.warmup_steps=4", "train.lr=1.0", "train.min_lr=0.1").train
    f = lr_lambda(tc, total_steps=14)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 14))


def test_deepspeed_config_takes_batch_clip_and_precision_from_ours(tmp_path: Path) -> None:
    tc = tiny_config(tmp_path, "train.deepspeed=configs/deepspeed/zero3.json", "train.clip=0.5").train
    ds = deepspeed_config(tc, world_size=4, bf16=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == tc.micro_batch_size * tc.grad_accum * 4
    assert ds["train_micro_batch_size_per_gpu"] == tc.micro_batch_size
    assert ds["gradient_accumulation_steps"] == tc.grad_accum
    assert (ds["gradient_clipping"], ds["bf16"]["enabled"], ds["wandb"]["enabled"]) == (0.5, True, False)
    with pytest.raises(FileNotFoundError, match="zero9.json"):
        deepspeed_config(
            tiny_config(tmp_path, "train.deepspeed=configs/deepspeed/zero9.json").train, 1, False
        )


@pytest.mark.parametrize("model", ["model.router_mode=token", "model.dense=true"], ids=["moe", "dense"])
def test_flops_per_token_matches_a_counted_training_step(tmp_path: Path, model: str) -> None:
    """The MFU numerator against ``FlopCounterMode`` over one forward and backward (attention as
    math SDPA, whose matmuls the counter sees; experts as the loop, plain matmuls). The formula
    also charges 6 FLOPs a token for each parameter that multiplies nothing, the norm weights, so
    it exceeds the count by exactly that. (User-routed layers add a few more such parameters, the
    routing signals' embedding rows and projections run once per sequence.)"""
    mc = model_config(tiny_config(tmp_path, model, "model.moe_backend=loop").model, VOCAB)
    net = MoERecForCausalLM(mc)
    b, t = 4, 24
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB.size // 2, VOCAB.size, (b, t), generator=g)
    domains = torch.randint(0, len(VOCAB.services), (b, t), generator=g)
    users = torch.randint(0, mc.num_user_buckets, (b,), generator=g)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(ids, domains, users, labels=ids).loss.backward()
    formula = flops_per_token(mc, parameter_report(net)["active_per_token"], seq_len=t) * b * t
    norms = sum(p.numel() for p in net.parameters() if p.ndim == 1)
    assert counter.get_total_flops() == formula - 6 * b * t * norms


def test_expert_load_figure_has_a_labelled_panel_per_layer() -> None:
    """One heat map per MoE layer, services down and experts across, with axis and tick labels, a
    title and one colour bar; the rendered image is large enough to read."""
    from moe_rec.train.metrics import expert_load_figure, figure_pixels

    services = ["grocery", "market", "delivery"]
    share = torch.rand(5, 3, 8, generator=torch.Generator().manual_seed(0))
    share /= share.sum(-1, keepdim=True)  # (L=5, S=3, E=8)
    fig = expert_load_figure(share, services, step=1200)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 5 and len(fig.axes) == 6
    assert "1,200" in fig.get_suptitle() and "share" in fig.get_suptitle()
    for layer, ax in enumerate(panels):
        assert ax.get_title() == f"MoE layer {layer}"
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "service")
        assert [t.get_text() for t in ax.get_yticklabels()] == services
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(8)]
        (image,) = ax.get_images()
        assert image.get_array().shape == (3, 8)  # services x experts
        torch.testing.assert_close(torch.as_tensor(image.get_array()), share[layer])
        assert image.get_clim() == (0.0, pytest.approx(share.max().item()))  # one scale for every panel
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert "share" in bar.get_ylabel()
    width, height = fig.get_size_inches()
    pixels = figure_pixels(fig)
    assert (
        pixels.shape == (round(height * fig.dpi), round(width * fig.dpi), 4) and pixels.dtype.name == "uint8"
    )
    assert 6 <= width <= 17.2 and 2 * 1.8 <= height <= 12  # inches: 3 panels a row, 2 rows


def test_disabled_wandb_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.wandb.mode=disabled`` needs no W&B installed (the GPU check's machine has none);
    metrics.jsonl is written all the same."""
    import sys

    import torch

    from moe_rec.train.metrics import RankZeroLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    path = tmp_path / "checkpoints" / "metrics.jsonl"
    logger = RankZeroLogger(
        rank=0, run_dir=tmp_path, metrics_path=path, project="p", mode="disabled", name="n", config={}
    )
    logger.log({"train/loss": 1.5}, step=3, kind="train")
    logger.log_expert_load(torch.ones(1, 2, 4), ["a", "b"], step=3)
    logger.finish()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 3, "kind": "train", "train/loss": 1.5}
    assert lines[1]["kind"] == "router" and lines[1]["router/expert_load"][0][0] == [0.25] * 4
    assert logger.location() == "W&B disabled"


def test_a_run_without_sids_or_with_an_unknown_best_metric_is_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"train.best_metric='valid/ndcg@11' is not a validation metric"):
        Trainer(tiny_config(run_dir, "train.best_metric=valid/ndcg@11"))
    for f in (run_dir / "sids").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="sid_table.json not found.*moe-rec sids build"):
        Trainer(tiny_config(run_dir))


@pytest.mark.parametrize(
    ("value", "steps"),
    [(100, 100), ("100 steps", 100), ("1step", 1), (0, 0), ("0 epochs", 0), ("1 epoch", 12), ("2 epochs", 24),
     ("0.5 epochs", 6), (".25epoch", 3), ("0.01 epochs", 1)],
)  # fmt: skip
def test_cadence_in_steps_or_epochs_becomes_steps(tmp_path: Path, value: object, steps: int) -> None:
    assert every_steps(value, steps_per_epoch=12) == steps
    tc = tiny_config(tmp_path, f"train.eval_every={value}", f"train.save_every={value if steps else 1}").train
    assert tc.in_steps(12).eval_every == steps and tc.in_steps(12).save_every == max(steps, 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.eval_every=2 weeks", r"eval_every: expected steps .* or epochs"),
     ("train.eval_every=-1", r"eval_every: expected steps"),
     ("train.save_every=1.5", r"save_every: a number of steps must be whole.*'1.5 epochs'"),
     ("train.save_every=0 epochs", "save_every must be more than 0"),
     ("train.save_every=true", r"train.save_every: expected int \| str")],
)  # fmt: skip
def test_a_cadence_that_is_neither_steps_nor_epochs_is_refused(
    tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, override)


def test_validation_and_checkpoints_every_epoch_or_half(run_dir: Path) -> None:
    """96 windows, 4 per micro batch, 2 micro batches a step: 12 steps an epoch, 2 epochs."""
    from moe_rec.train import train

    cfg = tiny_config(
        run_dir, "train.max_steps=0", "train.epochs=2", "train.eval_every=1 epoch", "train.save_every=0.5 epochs",
        "train.keep_last=10", "train.best_metric=valid/token_acc",
    )  # fmt: skip
    summary = train(cfg)
    assert summary["step"] == 24 and "an epoch is 12" in summary["plan"]
    lines = [json.loads(line) for line in (run_dir / "checkpoints/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "valid/token_acc" in r] == [12, 24]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        f"step_{s:08d}" for s in (6, 12, 18, 24)
    ]


def test_early_stopping_leaves_after_patience_validations_without_a_better_one(run_dir: Path) -> None:
    """With the learning rate at 0 nothing improves after the first validation: patience 2 at one
    validation every 2 steps stops at step 6 (best at 2), checkpointed; a rerun trains no further."""
    from moe_rec.train import train

    args = ("train.max_steps=20", "train.eval_every=2", "train.patience=2", "train.lr=0", "train.min_lr=0",
            "train.best_metric=valid/token_acc")  # fmt: skip
    summary = train(tiny_config(run_dir, *args))
    assert summary["step"] == 6 and summary["stopped_early"] and len(summary["losses"]) == 6
    assert (run_dir / "checkpoints" / "best").read_text().strip() == "step_00000002"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    again = train(tiny_config(run_dir, *args))
    assert again["step"] == 6 and again["losses"] == []
    longer = train(
        tiny_config(run_dir, *args[:2], "train.patience=0", *args[3:])
    )  # patience off: on to the end
    assert longer["step"] == 20


def test_item_overrides_leave_a_token_level_run_alone(run_dir: Path) -> None:
    """model.overrides.item_text on a token-level run (one config shared by both kinds): no text
    embeddings are loaded (this run has no catalogue to embed) and the run trains."""
    from moe_rec.train import train

    summary = train(tiny_config(run_dir, "model.overrides.item_text=true", "train.max_steps=2"))
    assert summary["step"] == 2


def test_negatives_per_step_needs_an_item_model_with_sampled_negatives(run_dir: Path) -> None:
    """train.negatives_per_step on a token-level run, or an item-level one without sampled negatives,
    is refused by name; with them a run trains."""
    from moe_rec.train import train

    with pytest.raises(ConfigError, match=r"train.negatives_per_step needs an item-level model"):
        Trainer(tiny_config(run_dir, "train.negatives_per_step=true"))
    with pytest.raises(ConfigError, match=r"model.overrides.item_negatives > 0"):
        Trainer(tiny_config(run_dir, "model.kind=item", "model.overrides.item_loss=items",
                            "train.negatives_per_step=true"))  # fmt: skip
    summary = train(tiny_config(run_dir, "model.kind=item", "model.overrides.item_loss=items",
                                "model.overrides.item_negatives=3", "train.negatives_per_step=true",
                                "train.grad_accum=2", "train.max_steps=2"))  # fmt: skip
    assert summary["step"] == 2
