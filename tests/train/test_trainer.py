"""The pieces of the trainer that need no process group: model sizing from the vocabulary, the LR
schedule, the DeepSpeed config written from ours, the FLOP count, and what start-up refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moe_rec.data.schema import DataError
from moe_rec.model import MoERecForCausalLM, parameter_report
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


def test_flops_count_matmuls_and_attention(tmp_path: Path) -> None:
    mc = model_config(tiny_config(tmp_path).model, VOCAB)
    n = 1000
    attn = flops_per_token(mc, n, seq_len=64) - flops_per_token(mc, n, seq_len=0)
    assert flops_per_token(mc, 2 * n, seq_len=0) == 2 * flops_per_token(mc, n, seq_len=0) == 12 * n
    assert attn == 12 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * 64


def test_expert_load_figure_has_a_labelled_panel_per_layer() -> None:
    """One heat map per MoE layer, services down and experts across, with axis and tick labels, a
    title and one colour bar; the rendered image is large enough to read."""
    import torch

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


def test_a_run_without_sids_or_with_an_unknown_best_metric_is_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"train.best_metric='valid/ndcg@11' is not a validation metric"):
        Trainer(tiny_config(run_dir, "train.best_metric=valid/ndcg@11"))
    for f in (run_dir / "sids").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="sid_table.json not found.*moe-rec sids build"):
        Trainer(tiny_config(run_dir))
