"""Upcycling tiny random Gemma / Gemma 2 / Gemma 3 models saved locally: with zero noise the MoE
model computes the dense model's logits; with noise the experts differ."""

from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
)

from moe_rec.model.upcycle import upcycle_gemma

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128)  # fmt: skip


def _gemma(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**COMMON))
    elif kind == "gemma2":
        cfg = Gemma2Config(**COMMON, attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=64,
                           query_pre_attn_scalar=24)  # fmt: skip
        model = Gemma2ForCausalLM(cfg)
    else:
        cfg = Gemma3TextConfig(**COMMON, sliding_window=64, query_pre_attn_scalar=24,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
        model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so copying them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("shared", [0, 1])
def test_zero_noise_upcycle_keeps_the_dense_function(tmp_path: Path, kind: str, shared: int) -> None:
    dense = _gemma(kind)
    dense.save_pretrained(tmp_path)
    model = upcycle_gemma(
        tmp_path, num_new_tokens=20, noise_std=0.0, num_experts=4, num_experts_per_tok=2,
        num_shared_experts=shared, router_mode="domain", num_domains=3,
    ).eval()  # fmt: skip
    assert model.config.vocab_size == 96 + 20 and model.config.sid_token_offset == 96
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    domains = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = dense(ids).logits
        got = model(ids, domains).logits
    # copies of one FFN weighted by router weights that sum to 1 compute it again, up to fp32
    # rounding (measured <= 2e-7)
    torch.testing.assert_close(got[..., :96], want, rtol=1e-5, atol=1e-5)


def test_noise_makes_experts_differ_and_dense_layers_copy(tmp_path: Path) -> None:
    _gemma("gemma").save_pretrained(tmp_path)
    model = upcycle_gemma(tmp_path, num_new_tokens=8, noise_std=0.05, num_experts=3, router_mode="token",
                          ffn_types=["moe", "dense", "moe"])  # fmt: skip
    w = model.model.layers[0].mlp.w_gate_up
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - w[1]).norm() / w[0].norm()
    assert 0.01 < rel < 0.2
    dense = GemmaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert model.lm_head.weight.shape[0] == 96 + 8


def test_unsupported_model_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="cannot be upcycled"):
        upcycle_gemma(tmp_path, num_new_tokens=4)
