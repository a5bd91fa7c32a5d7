"""Upcycle a dense Gemma / Gemma 2 / Gemma 3 causal LM saved on disk into a ``MoERecForCausalLM``.

Attention, norms and the text embeddings are copied; every routed expert of a layer starts as a
copy of that layer's dense FFN plus a little noise (``noise_std`` × the weight's own std), so the
experts can diverge (sparse upcycling, Komatsuzaki et al. 2023). With ``noise_std=0`` and no
shared expert the upcycled model computes exactly the dense model's function (the router's
top-k weights sum to one over identical experts); with shared experts, the shared and routed
parts each take half of the dense output projection, so the sum is again the dense FFN.

The vocabulary is extended: the LM's text tokens keep their ids and ours follow them
(``config.sid_token_offset`` = the LM's vocabulary size, so semantic-ID token ``i`` is
``offset + i``); new rows start at the mean text embedding plus noise.

Not carried over (a warning says so when the source uses them): Gemma 2 attention and final
logit soft-capping, and sliding-window attention (exact while sequences are shorter than the window).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_rec.model.config import MoERecConfig
from moe_rec.model.modeling import MoERecForCausalLM

logger = logging.getLogger(__name__)

SUPPORTED = ("gemma", "gemma2", "gemma3_text")


def _rope_thetas(cfg: Any) -> list[float]:
    """Per-layer rotary base of a Gemma config (Gemma 3 differs between sliding and full layers)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and all(t in params for t in set(layer_types)):  # {layer type: rope params}
        per_type = params
    else:
        per_type = {t: params for t in set(layer_types or ["full_attention"])}
        layer_types = layer_types or ["full_attention"] * cfg.num_hidden_layers
    thetas = []
    for t in layer_types:
        p = per_type[t]
        if p.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_type {p['rope_type']!r} ({t} layers) is not supported; only 'default' rotary"
            )
        thetas.append(float(p.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    return thetas


def _config_from_gemma(gcfg: Any, num_new_tokens: int, **overrides: Any) -> MoERecConfig:
    kind = gcfg.model_type
    if getattr(gcfg, "hidden_activation", None) not in (None, "gelu_pytorch_tanh") or getattr(
        gcfg, "hidden_act", "gelu_pytorch_tanh"
    ) not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError("only Gemma's tanh-approximated GELU feed-forward can be upcycled")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(gcfg, name, None):
            logger.warning(
                "%s=%s in the source model is not carried over (no soft-capping here)",
                name,
                getattr(gcfg, name),
            )
    fields: dict[str, Any] = dict(
        vocab_size=gcfg.vocab_size + num_new_tokens,
        sid_token_offset=gcfg.vocab_size,
        hidden_size=gcfg.hidden_size,
        num_hidden_layers=gcfg.num_hidden_layers,
        num_attention_heads=gcfg.num_attention_heads,
        num_key_value_heads=gcfg.num_key_value_heads,
        head_dim=gcfg.head_dim,
        intermediate_size=gcfg.intermediate_size,
        moe_intermediate_size=gcfg.intermediate_size,
        shared_intermediate_size=gcfg.intermediate_size,
        rms_norm_eps=gcfg.rms_norm_eps,
        max_position_embeddings=gcfg.max_position_embeddings,
        rope_thetas=_rope_thetas(gcfg),
        query_pre_attn_scalar=getattr(gcfg, "query_pre_attn_scalar", None) if kind != "gemma" else None,
        use_post_norms=kind != "gemma",
        use_qk_norm=kind == "gemma3_text",
        pad_token_id=gcfg.pad_token_id,
        bos_token_id=gcfg.bos_token_id,
        eos_token_id=gcfg.eos_token_id if isinstance(gcfg.eos_token_id, int) else gcfg.eos_token_id[0],
    )
    fields.update(overrides)
    return MoERecConfig(**fields)


def _noisy(w: torch.Tensor, noise_std: float, g: torch.Generator) -> torch.Tensor:
    return w + noise_std * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)


@torch.no_grad()
def upcycle_gemma(
    path: str | Path, *, num_new_tokens: int, noise_std: float = 0.01, seed: int = 0, **overrides: Any
) -> MoERecForCausalLM:
    """Build a MoERec model from the dense Gemma-family causal LM saved at ``path``.

    Args:
        path: a folder written by ``save_pretrained`` (config + safetensors), read offline.
        num_new_tokens: size of our vocabulary (appended after the LM's text tokens).
        noise_std: relative noise added to each expert copy (0 keeps the dense function exactly).
        seed: seed of that noise and of the new embedding rows.
        **overrides: any :class:`MoERecConfig` field (num_experts, router_mode, num_domains, ...).
    """
    gcfg = AutoConfig.from_pretrained(path)
    if gcfg.model_type not in SUPPORTED:
        raise ValueError(f"{path}: model_type {gcfg.model_type!r} cannot be upcycled; supported: {SUPPORTED}")
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = _config_from_gemma(gcfg, num_new_tokens, **overrides)
    model = MoERecForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    src = dense.model

    emb = src.embed_tokens.weight  # (V_text, D)
    new = emb.mean(0, keepdim=True) + noise_std * emb.std() * torch.randn(
        num_new_tokens, emb.shape[1], generator=g
    )
    model.model.embed_tokens.weight.copy_(torch.cat([emb, new]))
    model.model.norm.weight.copy_(src.norm.weight)

    norm_names = (
        {"input_norm": "input_layernorm", "pre_ffn_norm": "post_attention_layernorm"}
        if gcfg.model_type == "gemma"
        else {
            "input_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm",
            "pre_ffn_norm": "pre_feedforward_layernorm",
            "post_ffn_norm": "post_feedforward_layernorm",
        }
    )
    for ours, theirs in zip(model.model.layers, src.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(ours.self_attn, name).weight.copy_(getattr(theirs.self_attn, name).weight)
        if cfg.use_qk_norm:
            ours.self_attn.q_norm.weight.copy_(theirs.self_attn.q_norm.weight)
            ours.self_attn.k_norm.weight.copy_(theirs.self_attn.k_norm.weight)
        for our_name, their_name in norm_names.items():
            getattr(ours, our_name).weight.copy_(getattr(theirs, their_name).weight)
        gate, up, down = (getattr(theirs.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
        if not ours.is_moe:
            for n, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                getattr(ours.mlp, n).weight.copy_(w)
            continue
        share = 0.5 if cfg.num_shared_experts else 1.0
        gate_up = torch.cat([gate.T, up.T], dim=1)  # (D, 2F): [gate | up], as the experts expect
        for e in range(cfg.num_experts):
            ours.mlp.w_gate_up[e].copy_(_noisy(gate_up, noise_std, g))
            ours.mlp.w_down[e].copy_(_noisy(down.T * share, noise_std, g))  # (F, D)
        if ours.mlp.shared_expert is not None:
            if cfg.num_shared_experts != 1:
                raise ValueError("upcycling supports at most one shared expert (a copy of the dense FFN)")
            shared = ours.mlp.shared_expert
            shared.gate_proj.weight.copy_(gate)
            shared.up_proj.weight.copy_(up)
            shared.down_proj.weight.copy_(down * share)
    model.tie_weights()
    return model
